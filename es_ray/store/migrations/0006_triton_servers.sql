-- Migration 6: where each model version is served. In the embedded stack every deployed version has a
-- tritonserver of its own (es_ray/lifecycle/version_servers.py); the lifecycle driver records its gRPC
-- address here once the version answers, and every client finds it on the version's lifecycle target
-- (es_ray/inference/triton_client.py, grpc_address). NULL: the stack's one Triton (an external triton.url).
ALTER TABLE models ADD COLUMN triton_grpc_url text;
