-- Migration 7: every change of the blue pointer notifies the channel es_ray_blue (at commit), so Serve
-- replicas re-read it at once instead of polling it every second (es_ray/serve/blue_watcher.py).
-- A statement trigger: one notification per statement, none for a row only locked (FOR UPDATE/SHARE).
CREATE FUNCTION es_ray_blue_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('es_ray_blue', '');
    RETURN NULL;
END $$;
CREATE TRIGGER blue_changed AFTER INSERT OR UPDATE OR DELETE ON blue
    FOR EACH STATEMENT EXECUTE FUNCTION es_ray_blue_changed();
