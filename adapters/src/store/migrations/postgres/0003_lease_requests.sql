-- tokenfence PostgreSQL schema, version 3: lease request ids and displaced rows.
-- {schema} is replaced by the quoted schema name.
--
-- request: the LeaseRequestId the row was granted to (the same 64 bits as BIGINT,
-- like generations). A request retried after its answer was lost carries the same
-- id, so the store recognises its own earlier grant (same owner, same request) and
-- does not report it as a takeover (find 18). Rows written before version 3 get 0,
-- an id the machine does not draw in practice: they are treated as grants to an
-- unknown request, so the next acquisition reports them, as before.
--
-- displaced_*: the unreleased lease row this one displaced (owner, acquired_at,
-- expires_at, generation, request), all NULL when there was none (displaced_owner
-- says which; displaced_generation is NULL also when that row had no record). A
-- retry inherits it, and a release with restore puts it back as the lease row.
-- Rows written before version 3 have none.
ALTER TABLE {schema}.tokenfence_leases ADD COLUMN request BIGINT NOT NULL DEFAULT 0;
ALTER TABLE {schema}.tokenfence_leases ADD COLUMN displaced_owner TEXT;
ALTER TABLE {schema}.tokenfence_leases ADD COLUMN displaced_acquired_at BIGINT;
ALTER TABLE {schema}.tokenfence_leases ADD COLUMN displaced_expires_at BIGINT;
ALTER TABLE {schema}.tokenfence_leases ADD COLUMN displaced_generation BIGINT;
ALTER TABLE {schema}.tokenfence_leases ADD COLUMN displaced_request BIGINT;
ALTER TABLE {schema}.tokenfence_leases ADD CONSTRAINT tokenfence_leases_displaced_whole
    CHECK (num_nulls(displaced_owner, displaced_acquired_at, displaced_expires_at,
                     displaced_request) IN (0, 4));
