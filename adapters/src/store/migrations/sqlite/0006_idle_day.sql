-- tokenfence SQLite schema, version 6: the keep-alive scan finds rows by the day
-- of their idle deadline.
--
-- idle_day: idle_deadline rounded down to a multiple of a day (86,400,000 ms since
-- the epoch); NULL when idle_deadline is. Every refresh moves the idle deadline
-- (Intuit: an hour later each hour), and an index on it was one more page written,
-- and fsynced, by every compare-and-swap; the day moves about once a day. The scan
-- reads the day's index up to its bound and keeps the rows whose exact
-- idle_deadline (no longer indexed) is due.
--
-- The database keeps idle_day, not the store's code: the triggers below set it
-- whenever a write that inserts a row or sets idle_deadline leaves it different
-- from its deadline's day, whoever wrote
-- (a build before version 6 still running during a rolling deploy sets
-- idle_deadline only, and may move it earlier). A write that leaves the day as it
-- was runs no nested update and touches no page of the index.
ALTER TABLE tokenfence_connections ADD COLUMN idle_day INTEGER;
UPDATE tokenfence_connections SET idle_day = idle_deadline - idle_deadline % 86400000
    WHERE idle_deadline IS NOT NULL;
DROP INDEX tokenfence_connections_idle_deadline;
CREATE INDEX tokenfence_connections_idle_day
    ON tokenfence_connections (idle_day) WHERE idle_day IS NOT NULL;
CREATE TRIGGER tokenfence_connections_idle_day_insert
    AFTER INSERT ON tokenfence_connections
    WHEN NEW.idle_day IS NOT (NEW.idle_deadline - NEW.idle_deadline % 86400000)
BEGIN
    UPDATE tokenfence_connections
        SET idle_day = NEW.idle_deadline - NEW.idle_deadline % 86400000
        WHERE id = NEW.id;
END;
CREATE TRIGGER tokenfence_connections_idle_day_update
    AFTER UPDATE OF idle_deadline ON tokenfence_connections
    WHEN NEW.idle_day IS NOT (NEW.idle_deadline - NEW.idle_deadline % 86400000)
BEGIN
    UPDATE tokenfence_connections
        SET idle_day = NEW.idle_deadline - NEW.idle_deadline % 86400000
        WHERE id = NEW.id;
END;
