"""Load tests and benchmarks that use a target server the way EAGLE-3 training ranks do."""
