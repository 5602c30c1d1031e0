//! Packet building and checking helpers for BPF_PROG_TEST_RUN tests.
