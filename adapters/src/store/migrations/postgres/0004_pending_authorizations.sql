-- tokenfence PostgreSQL schema, version 4: authorizations begun and not yet finished.
--
-- {schema} is replaced by the quoted schema name.
-- state_key: SHA-256 of the flow's `state`, hex (the state itself is never stored).
-- sealed: the pending authorization (connection, client, redirect URI, PKCE
-- verifier, expiry) as JSON sealed with the keyring, bound to state_key.
-- expires_at: milliseconds since the epoch; expired rows are dropped as new ones
-- are written. A row is taken (deleted and returned) exactly once.
CREATE TABLE {schema}.tokenfence_pending_authorizations (
    state_key  TEXT PRIMARY KEY NOT NULL,
    sealed     BYTEA NOT NULL,
    expires_at BIGINT NOT NULL
);
