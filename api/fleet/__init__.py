"""Fleet mode: the desired state of many nodes in etcd (docs/fleet.md)."""
