"""A bot's writer: adds one coin to a user in its own transaction, again and again.

Usage: python3 add_coins.py DB SECONDS USER_ID
Prints the number of increments that committed (a failed COMMIT is rolled back and
not counted): the ground truth the sync is checked against.
"""
import sqlite3
import sys
import time

db, seconds, user = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
conn = sqlite3.connect(db, timeout=10, isolation_level=None)
committed = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE users SET coins = coins + 1 WHERE id = ?", (user,))
        conn.execute("COMMIT")
        committed += 1
    except sqlite3.OperationalError:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.OperationalError:
            pass
    time.sleep(0.002)
print(committed)
