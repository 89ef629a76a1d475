"""The lab: emulated hosts in network namespaces, described by a topology file.

    topology  the TOML file, validated into frozen dataclasses; namespace names (pure)
    netns     namespaces, `ip` and processes, with subprocess (no pyroute2: that is kernel/'s)
    control   up, down, finding a node's namespace
    pcap      a minimal classic pcap reader
    dissect   one line per captured underlay packet (ipip, gre, sit), decoded with tunl.wire
    demo      ping every target of every other host, decode the underlay capture
    cli       `tunl lab ...`: main(argv) -> exit code
"""
