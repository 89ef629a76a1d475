"""The lab: emulated hosts in network namespaces, described by a topology file.

    topology  the TOML file, validated into frozen dataclasses; namespace names (pure)
    netns     namespaces, `ip` and processes, with subprocess (no pyroute2: that is kernel/'s)
    control   up, down, finding a node's namespace
    pcap      a minimal classic pcap reader
    dissect   one line per captured underlay packet (ipip, gre, sit), decoded with tunl.wire
    demo      ping every target of every other host, decode the underlay capture; for a mesh,
              join, ping every pair, kill a node and bring it back, with the timings
    mesh      a topology's mesh: its registry (SQLite, or etcd in the underlay), init, agents
    etcd      a real local etcd cluster (members as processes, health, kill and restart)
    cli       `tunl lab ...`: main(argv) -> exit code
"""
