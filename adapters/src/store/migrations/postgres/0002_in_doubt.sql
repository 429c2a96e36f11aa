-- tokenfence PostgreSQL schema, version 2: a refresh in doubt is due for work at
-- once. {schema} is replaced by the quoted schema name.
--
-- Milliseconds since the epoch; NULL unless the record is live and says a refresh
-- may have rotated its refresh token unseen (since when). `due_for_work` reports
-- such rows whatever their keep-alive instant, so that a doubt left by a process
-- that stopped is resolved by another while the provider's grace window is open.
-- Rows written before version 2 get the column on their next write.
ALTER TABLE {schema}.tokenfence_connections ADD COLUMN in_doubt_since BIGINT;

CREATE INDEX tokenfence_connections_in_doubt_since
    ON {schema}.tokenfence_connections (in_doubt_since) WHERE in_doubt_since IS NOT NULL;
