-- tokenfence SQLite schema, version 5: the lease table loses its index on
-- expires_at.
--
-- A lease row lives from a refresh's start to its commit (the commit deletes it),
-- so the table holds the refreshes in flight and the rows of workers that died
-- mid-refresh, a few rows, not one per connection. Scanning it for expired rows
-- (due_for_work) costs less than the index did: one more page written, and
-- fsynced, by every lease grant and every release.
DROP INDEX tokenfence_leases_expires_at;
