-- tokenfence SQLite schema, version 3: lease request ids and displaced rows.
--
-- request: the LeaseRequestId the row was granted to (64 bits as INTEGER, like
-- generations). A request retried after its answer was lost carries the same id,
-- so the store recognises its own earlier grant (same owner, same request) and does
-- not report it as a takeover (find 18). Rows written before version 3 get 0, an id
-- the machine does not draw in practice: they are treated as grants to an unknown
-- request, so the next acquisition reports them, as before.
--
-- displaced_*: the unreleased lease row this one displaced (owner, acquired_at,
-- expires_at, generation, request), all NULL when there was none (displaced_owner
-- says which; displaced_generation is NULL also when that row had no record). A
-- retry inherits it, and a release with restore puts it back as the lease row.
-- Rows written before version 3 have none.
ALTER TABLE tokenfence_leases ADD COLUMN request INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tokenfence_leases ADD COLUMN displaced_owner TEXT;
ALTER TABLE tokenfence_leases ADD COLUMN displaced_acquired_at INTEGER;
ALTER TABLE tokenfence_leases ADD COLUMN displaced_expires_at INTEGER;
ALTER TABLE tokenfence_leases ADD COLUMN displaced_generation INTEGER;
ALTER TABLE tokenfence_leases ADD COLUMN displaced_request INTEGER;
