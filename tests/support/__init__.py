"""Test scaffolding, not part of the package: `probes` runs the real NetFlow tools (softflowd, fprobe,
nfcapd/nfdump, tcpdump) on loopback; `stories` generates the seeded traffic stories (the packet-level incident
story behind sample_data/story and the multi-day flow story of the detector tests). benchmarks/ and
sample_data/make_*.py import them with tests/ on sys.path."""
