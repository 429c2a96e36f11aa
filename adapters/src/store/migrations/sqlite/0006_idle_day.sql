-- tokenfence SQLite schema, version 6: the keep-alive scan finds rows by the day
-- of their idle deadline.
--
-- idle_day: idle_deadline rounded down to a multiple of a day (86,400,000 ms since
-- the epoch); NULL when idle_deadline is. Every refresh moves the idle deadline
-- (Intuit: an hour later each hour), and an index on it was one more page written,
-- and fsynced, by every compare-and-swap; the day moves about once a day, and the
-- store sets it only when it moves. The scan reads the index up to its bound and
-- keeps the rows whose exact idle_deadline (no longer indexed) is due.
--
-- Rows an older build inserts during a rolling deploy have no idle_day: the second
-- index holds exactly those (an update of a row with a day touches neither its
-- pages nor its fsync) and the scan reads it too. A row an older build updates keeps
-- the day it had, which stays a lower bound while idle deadlines only move later.
ALTER TABLE tokenfence_connections ADD COLUMN idle_day INTEGER;
UPDATE tokenfence_connections SET idle_day = idle_deadline - idle_deadline % 86400000
    WHERE idle_deadline IS NOT NULL;
DROP INDEX tokenfence_connections_idle_deadline;
CREATE INDEX tokenfence_connections_idle_day
    ON tokenfence_connections (idle_day) WHERE idle_day IS NOT NULL;
CREATE INDEX tokenfence_connections_idle_undated
    ON tokenfence_connections (idle_deadline)
    WHERE idle_day IS NULL AND idle_deadline IS NOT NULL;
