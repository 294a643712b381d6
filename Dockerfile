# xdpfw: the XDP firewall service in a container. Build: `docker build -t xdpfw .`; run it with
# docker-compose.yml (host network, CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON, not privileged).
# Everything about privileges and what was and was not exercised: docs/deployment.md.
#
# The layout mirrors `make setup` (scripts/setup.sh): Debian's python3-bpfcc, a venv made with
# --system-site-packages so it sees bcc, the project installed into it, and kernel headers for
# bcc's run-time compile found or assembled by `python -m xdpfw.kernel.kheaders`.
FROM debian:bookworm-slim

ARG DEBIAN_FRONTEND=noninteractive

# python3-bpfcc: bcc (it compiles bpf/xdp_filter.c when the service starts; the PyPI package
# called "bcc" is another project). linux-headers-<arch>: the header tree bcc compiles against;
# Debian's are good enough for any host kernel because the program uses stable UAPI structs only.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-bpfcc "linux-headers-$(dpkg --print-architecture)" \
    && rm -rf /var/lib/apt/lists/*

# A regular (not editable) install: the package carries the C program as package data
# (setup.py maps bpf/ to xdpfw/_bpf, where xdpfw.abi finds it), so the sources are removed
# once it is installed.
COPY pyproject.toml setup.py /opt/xdpfw/src/
COPY bpf/ /opt/xdpfw/src/bpf/
COPY xdpfw/ /opt/xdpfw/src/xdpfw/
COPY api/ /opt/xdpfw/src/api/
COPY deploy/docker/healthcheck.py /opt/xdpfw/healthcheck.py

RUN /usr/bin/python3 -m venv --system-site-packages /opt/xdpfw/venv \
    && /opt/xdpfw/venv/bin/python -m pip install --no-cache-dir --disable-pip-version-check \
        /opt/xdpfw/src \
    && rm -rf /opt/xdpfw/src \
    && /opt/xdpfw/venv/bin/python -c 'import bcc; from xdpfw import abi; assert abi.PROGRAM.is_file()' \
    && /opt/xdpfw/venv/bin/python -m compileall -q /opt/xdpfw/healthcheck.py

# Kernel headers: the host's kernel has none in the image, so xdpfw.kernel.kheaders merges Debian's
# -common and arch directories into one tree under /var/cache/xdpfw, now, at build time. The
# build host's own kernel must not matter (were it Debian's, kheaders would settle for
# /lib/modules/<release>/build and build nothing), hence LIB_MODULES pointed at nothing. At run
# time the same lookup finds the finished tree and only reads it: the root fs stays read-only.
ENV XDPFW_KHEADERS_CACHE=/var/cache/xdpfw/kernel-headers
RUN /opt/xdpfw/venv/bin/python -c 'import sys, xdpfw.kernel.kheaders as k; k.LIB_MODULES = "/nonexistent"; sys.exit(k.main())'

# Service defaults; compose/Kubernetes set XDPFW_IFACE and may override the rest.
ENV XDPFW_STATE_DIR=/var/lib/xdpfw \
    XDPFW_BPFFS_DIR=/sys/fs/bpf/xdpfw \
    XDPFW_LISTEN=127.0.0.1:8000 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
VOLUME ["/var/lib/xdpfw"]

# Runs as uid 0 but with only the capabilities the runtime grants (compose: cap_drop ALL plus
# BPF, NET_ADMIN, PERFMON): Docker and Kubernetes hand capabilities to uid 0 only, since they
# set no ambient capabilities for other users. All files above are root-owned and the compose
# file mounts the root file system read-only; the writable places are the state volume, /tmp
# and the pin directory on bpffs.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["/opt/xdpfw/venv/bin/python", "/opt/xdpfw/healthcheck.py"]
STOPSIGNAL SIGTERM
# --no-demo: without XDPFW_IFACE, start unattached (add interfaces over the API) instead of
# building a demo namespace, which would need CAP_SYS_ADMIN.
ENTRYPOINT ["/opt/xdpfw/venv/bin/xdpfw"]
CMD ["serve", "--no-demo"]
