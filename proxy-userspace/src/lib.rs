//! xdp-proxy: the daemon and CLI around the XDP fast path.
