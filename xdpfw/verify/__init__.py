"""Tools that prove the product, not part of it: the service never imports them.

- `model`: the executable reference of the verdict (the oracle of every comparison).
- `frames`: builds Ethernet frames of every kind the parser handles (tests, bench).
- `harness`: runs the loaded program through BPF_PROG_TEST_RUN and compares it, frame by
  frame and map by map, with the model and a fresh compile.
- `soak`: random rule sets and frames for the harness (`python -m xdpfw.verify.soak`).
"""
