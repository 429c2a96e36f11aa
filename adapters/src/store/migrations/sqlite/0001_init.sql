-- tokenfence SQLite schema, version 1.
--
-- One row per connection: plain columns for queries, and the whole record as JSON
-- sealed with AES-256-GCM (see crypto.rs), bound to the connection id.
CREATE TABLE tokenfence_connections (
    id            TEXT    NOT NULL PRIMARY KEY,
    -- +1 on every committed change; the compare-and-swap guard.
    generation    INTEGER NOT NULL,
    -- active | degraded | reauth_required | disconnected (for operators; the
    -- sealed record is authoritative).
    status        TEXT    NOT NULL,
    -- Milliseconds since the epoch; NULL unless the record is live and the provider
    -- has an idle deadline. Keep-alive is due when idle_deadline - lead <= now and
    -- keepalive_floor <= now (never before half the idle window since the last
    -- refresh, whatever the lead).
    idle_deadline INTEGER,
    keepalive_floor INTEGER,
    updated_at    INTEGER NOT NULL,
    sealed        BLOB    NOT NULL
) WITHOUT ROWID;

CREATE INDEX tokenfence_connections_idle_deadline
    ON tokenfence_connections (idle_deadline) WHERE idle_deadline IS NOT NULL;

-- At most one lease per connection, kept until its owner releases it or another
-- worker takes it over after expiry. A lease may exist before the record does.
CREATE TABLE tokenfence_leases (
    id          TEXT    NOT NULL PRIMARY KEY,
    owner       TEXT    NOT NULL,
    acquired_at INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    -- The record's generation when the lease was granted; NULL: no record yet.
    generation  INTEGER
) WITHOUT ROWID;

CREATE INDEX tokenfence_leases_expires_at ON tokenfence_leases (expires_at);
