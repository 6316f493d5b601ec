"""Cluster seams: the online route table and (later) node-to-node forwarding."""
