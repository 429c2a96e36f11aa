-- tokenfence PostgreSQL schema, version 1. {schema} is replaced by the quoted
-- schema name. Run under an advisory lock, in a transaction, exactly once.
--
-- One row per connection: plain columns for queries, and the whole record as JSON
-- sealed with AES-256-GCM (see crypto.rs), bound to the connection id. Ids sort
-- bytewise (COLLATE "C"), like every other tokenfence store.
CREATE TABLE {schema}.tokenfence_connections (
    id            TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    -- +1 on every committed change; the compare-and-swap guard.
    generation    BIGINT NOT NULL,
    -- active | degraded | reauth_required | disconnected (for operators; the
    -- sealed record is authoritative).
    status        TEXT   NOT NULL,
    -- Milliseconds since the epoch; NULL unless the record is live and the provider
    -- has an idle deadline. Keep-alive is due when idle_deadline - lead <= now and
    -- keepalive_floor <= now (never before half the idle window since the last
    -- refresh, whatever the lead).
    idle_deadline BIGINT,
    keepalive_floor BIGINT,
    updated_at    BIGINT NOT NULL,
    sealed        BYTEA  NOT NULL
);

CREATE INDEX tokenfence_connections_idle_deadline
    ON {schema}.tokenfence_connections (idle_deadline) WHERE idle_deadline IS NOT NULL;

-- At most one lease per connection, kept until its owner releases it or another
-- worker takes it over after expiry. A lease may exist before the record does.
CREATE TABLE {schema}.tokenfence_leases (
    id          TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    owner       TEXT   NOT NULL,
    acquired_at BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    -- The record's generation when the lease was granted; NULL: no record yet.
    generation  BIGINT
);

CREATE INDEX tokenfence_leases_expires_at ON {schema}.tokenfence_leases (expires_at);
