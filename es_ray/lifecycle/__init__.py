"""Blue/green: the lifecycle driver (a detached Ray actor that bootstraps, keeps Triton loaded and runs
tasks), the reindex job, switch/rollback/cleanup and the self-improvement cycle job."""
