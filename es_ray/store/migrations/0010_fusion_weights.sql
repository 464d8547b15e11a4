-- Migration 10: the hybrid fusion each collection serves with, once learned from clicks and promoted
-- through the quality gate (es_ray/train/fusion_weights.py); a collection without a row serves search.*'s
-- configured fusion. Its MLflow run records how it was learned, and it is a version of the registered
-- model mlflow.registered_fusion. A change notifies es_ray_blue (the
-- function of migration 0007), so replicas re-read it with the blue pointer instead of per search.
CREATE TABLE fusion_weights (
    collection     text PRIMARY KEY REFERENCES collections (name) ON DELETE CASCADE,
    k              double precision NOT NULL CHECK (k > 0),
    dense_weight   double precision NOT NULL CHECK (dense_weight >= 0),
    lexical_weight double precision NOT NULL CHECK (lexical_weight >= 0),
    mlflow_run_id  text,
    mlflow_version integer,
    gate           jsonb NOT NULL,
    promoted_at    timestamptz NOT NULL DEFAULT now()
);
CREATE TRIGGER fusion_weights_changed AFTER INSERT OR UPDATE OR DELETE ON fusion_weights
    FOR EACH STATEMENT EXECUTE FUNCTION es_ray_blue_changed();
