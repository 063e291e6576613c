-- 1,000,000 rows of text and integers: the bench's shared starting point.
PRAGMA journal_mode = DELETE;
CREATE TABLE users (
    id INTEGER PRIMARY KEY,
    nick TEXT NOT NULL,
    email TEXT,
    coins INTEGER NOT NULL,
    points INTEGER NOT NULL,
    updated_at TEXT NOT NULL
);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000000)
INSERT INTO users SELECT i, 'nick' || i, 'user' || i || '@example.org', i % 1000, i % 77,
                         '2025-11-01T10:00:00Z' FROM n;
