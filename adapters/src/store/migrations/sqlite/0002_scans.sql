-- tokenfence SQLite schema, version 2: columns for the scans that find work nobody
-- asked for. Both are NULL unless the record is live; rows written before version 2
-- get them on their next write.
--
-- in_doubt_since: milliseconds since the epoch since the record says a refresh may
-- have rotated its refresh token unseen. `due_for_work` reports such rows whatever
-- their keep-alive instant, so that a doubt left by a process that stopped is
-- resolved by another while the provider's grace window is open.
--
-- hard_deadline: when the refresh token dies whatever happens (Intuit's 5-year
-- cap). `notices_due` reports rows whose ReconnectSoon notice instant falls in a
-- window, so that a process that starts announces it without waiting for a caller.
ALTER TABLE tokenfence_connections ADD COLUMN in_doubt_since INTEGER;
ALTER TABLE tokenfence_connections ADD COLUMN hard_deadline INTEGER;

CREATE INDEX tokenfence_connections_in_doubt_since
    ON tokenfence_connections (in_doubt_since) WHERE in_doubt_since IS NOT NULL;
CREATE INDEX tokenfence_connections_hard_deadline
    ON tokenfence_connections (hard_deadline) WHERE hard_deadline IS NOT NULL;
