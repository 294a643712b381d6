"""X-ray: sampled frames of chosen rules (issue 17).

`record.py` turns a ring buffer record into a `Sample` and a `Sample` into the JSON event of
`GET /v1/events` and back; `pcapng.py` writes samples as pcapng (tcpdump, tshark, Wireshark),
the rule and verdict in each packet's comment; `hub.py` (service side) reads the ring in a
thread and fans samples out to the subscribers of the event stream.
"""
