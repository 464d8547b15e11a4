"""Items in: BEIR collections and the Ray Data pipelines that embed items through Triton and
write them to every live collection (dual writes; the HTTP upsert path and the bulk upsert job). Reindexing is a lifecycle step (es_ray.lifecycle)."""
