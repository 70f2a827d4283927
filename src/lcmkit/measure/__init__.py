"""Quality and speed: eval (metrics, reports), bench (throughput, latency, memory), system info, benchmark
architectures."""
