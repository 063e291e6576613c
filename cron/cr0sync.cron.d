# cr0sync: the four every-minute jobs for /etc/cron.d. Install it as /etc/cron.d/cr0sync
# (no dot in the installed name, or cron ignores the file), owned by root, mode 644.
# The sixth field is the user the jobs run as.
SHELL=/bin/sh
PATH=/usr/local/bin:/usr/bin:/bin
MAILTO=root
* * * * * cr0 /usr/local/bin/cr0sync --root /data/cr0_system cron database
* * * * * cr0 /usr/local/bin/cr0sync --root /data/cr0_system cron logs
* * * * * cr0 /usr/local/bin/cr0sync --root /data/cr0_system cron security
* * * * * cr0 /usr/local/bin/cr0sync --root /data/cr0_system cron files
