-- tokenfence SQLite schema, version 2: columns for the scans that find work nobody
-- asked for. Both are NULL unless the record is live; rows written before version 2
-- get them on their next write.
--
-- pending_work_at: milliseconds since the epoch at which work is due whatever the
-- keep-alive lead (`ConnectionRecord::pending_work_at`): since when the record says
-- a refresh may have rotated its refresh token unseen, or when a degraded
-- connection's retry is due. `due_for_work` reports such rows, so that a doubt
-- left by a process that stopped is resolved by another while the provider's grace
-- window is open, and a degraded connection recovers without waiting for a caller.
--
-- hard_deadline: when the refresh token dies whatever happens (Intuit's 5-year
-- cap). `notices_due` reports rows whose ReconnectSoon notice instant falls in a
-- window, so that a process that starts announces it without waiting for a caller.
ALTER TABLE tokenfence_connections ADD COLUMN pending_work_at INTEGER;
ALTER TABLE tokenfence_connections ADD COLUMN hard_deadline INTEGER;

CREATE INDEX tokenfence_connections_pending_work_at
    ON tokenfence_connections (pending_work_at) WHERE pending_work_at IS NOT NULL;
CREATE INDEX tokenfence_connections_hard_deadline
    ON tokenfence_connections (hard_deadline) WHERE hard_deadline IS NOT NULL;
