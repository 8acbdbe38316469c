"""The `igw` command line: dev PKI, `igw up`, health probes, agent and operator commands."""
