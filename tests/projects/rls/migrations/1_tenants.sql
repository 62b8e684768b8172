-- The app connects as app_rw, a role without ownership: its grants and the tenant policy are all it has.
-- Roles are the server's, not the database's: create it once, whichever migration run comes first.
DO $$ BEGIN CREATE ROLE app_rw NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;

CREATE TABLE items (
    id serial PRIMARY KEY,
    tenant_id text NOT NULL,
    name text NOT NULL
);
ALTER TABLE items ENABLE ROW LEVEL SECURITY;
-- each tenant sees and writes only its own rows; the app sets app.tenant_id per request
CREATE POLICY tenant_isolation ON items TO app_rw
    USING (tenant_id = current_setting('app.tenant_id', true))
    WITH CHECK (tenant_id = current_setting('app.tenant_id', true));
GRANT SELECT, INSERT, UPDATE ON items TO app_rw;
GRANT USAGE ON SEQUENCE items_id_seq TO app_rw;

-- written by the back office only: the app has no grant on it
CREATE TABLE audit (id serial PRIMARY KEY, note text NOT NULL);

INSERT INTO items (tenant_id, name) VALUES ('a', 'apple'), ('b', 'banana');
