//! `cr0sync demo`: a self-contained root with a bot side and a website side,
//! built from `fixtures/` (compiled in, so it works from any directory), on which every job
//! runs once before `status` is printed.
//!
//! Invariants: the demo only ever writes inside its own directory, and it only deletes a
//! directory that carries its marker file, so `--dir` pointing at real data is refused.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};

use crate::context::{Context, Location};
use crate::jobs::Job;
use crate::jobs::runner::run_job;
use crate::jobs::status;
use crate::ops::task::Trigger;

const MARKER: &str = ".cr0sync-demo";
const USERS_SQL: &str = include_str!("../fixtures/users.sql");
const BOT_CHANGES: &str = include_str!("../fixtures/bot_changes.sql");
const WEBSITE_CHANGES: &str = include_str!("../fixtures/website_changes.sql");
const IRC_LOG: &str = include_str!("../fixtures/logs/rizon/#cr0.log");
const WEBSITE_SQL: &str = include_str!("../fixtures/website.sql");

/// A registration with a post, as the site (or the bot) writes it: AUTOINCREMENT hands out
/// the next free ids, the FTS triggers index the post.
fn register(nick: &str) -> String {
    format!(
        "PRAGMA foreign_keys = ON;\n\
         INSERT INTO users (nick) VALUES ('{nick}');\n\
         INSERT INTO posts (user_id, title, body) VALUES (last_insert_rowid(), 'hi from {nick}', \
         '{nick} joined the channel');\n"
    )
}

/// The demo's directories.
#[derive(Debug, Clone)]
pub struct Demo {
    pub dir: PathBuf,
    pub root: PathBuf,
    pub bot: PathBuf,
    pub website: PathBuf,
}

impl Demo {
    pub fn new(dir: &Path) -> Demo {
        Demo {
            dir: dir.to_path_buf(),
            root: dir.join("root"),
            bot: dir.join("bot"),
            website: dir.join("website"),
        }
    }

    pub fn bot_db(&self) -> PathBuf {
        self.bot.join("data/users.db")
    }

    pub fn website_db(&self) -> PathBuf {
        self.website.join("data/users.db")
    }

    /// The application database with the website's real schema (UNIQUE nick,
    /// AUTOINCREMENT ids, cascades, an audit trigger, a full-text index).
    pub fn site_db(&self, side: &Path) -> PathBuf {
        side.join("data/site.db")
    }

    pub fn bot_logs(&self) -> PathBuf {
        self.bot.join("logs")
    }

    /// A site's directory of per-user balance files.
    pub fn balances(&self, side: &Path) -> PathBuf {
        side.join("userdata/balances")
    }

    /// The demo's configuration: the template's defaults plus the demo's sides.
    pub fn config_text(&self) -> String {
        format!(
            "# cr0sync demo configuration (written by `cr0sync demo`).\n\
             [general]\nbusy_timeout = \"5s\"\n\n\
             [[database.db]]\nname = \"users\"\ncounters = {{ users = [\"coins\"] }}\n\
             peers = [\n  {{ name = \"bot\", path = \"{bot_db}\" }},\n  \
             {{ name = \"website\", path = \"{website_db}\" }},\n]\n\n\
             [[database.db]]\nname = \"site\"\n\
             peers = [\n  {{ name = \"bot\", path = \"{bot_site}\" }},\n  \
             {{ name = \"website\", path = \"{website_site}\" }},\n]\n\n\
             [[logs.stream]]\nname = \"rizon\"\nfrom = \"{bot_logs}\"\n\
             to = \"logs/irc_networks/rizon\"\n\n\
             [security]\nintegrity_paths = [\"{website}\", \"shared_storage/api_keys.json\"]\n\n\
             [[files.tree]]\nname = \"balances\"\ncentral = \"shared_storage/userdata/balances\"\n\
             include = [\"*.txt\"]\njson_counters = [\"balance\"]\nwrite = \"flock\"\n\
             peers = [\n  {{ name = \"bot\", path = \"{bot_balances}\" }},\n  \
             {{ name = \"website\", path = \"{website_balances}\" }},\n]\n",
            bot_db = self.bot_db().display(),
            bot_logs = self.bot_logs().display(),
            website_db = self.website_db().display(),
            bot_site = self.site_db(&self.bot).display(),
            website_site = self.site_db(&self.website).display(),
            website = self.website.display(),
            bot_balances = self.balances(&self.bot).display(),
            website_balances = self.balances(&self.website).display(),
        )
    }

    /// Removes an earlier demo and builds a fresh one.
    pub fn build(&self) -> Result<()> {
        prepare_dir(&self.dir)?;
        fs::write(
            self.dir.join(MARKER),
            b"made by cr0sync demo; safe to delete\n",
        )?;
        let location = Location {
            root: Some(self.root.clone()),
            config: None,
        };
        crate::init::init(&location)?;
        crate::fsutil::atomic_write(
            &self.root.join("cr0sync.toml"),
            self.config_text().as_bytes(),
            0o664,
            &crate::fsutil::Perms::default(),
        )?;
        for side in [&self.bot_db(), &self.website_db()] {
            create_db(side, USERS_SQL)?;
        }
        for side in [&self.bot, &self.website] {
            create_db(&self.site_db(side), WEBSITE_SQL)?;
        }
        for side in [&self.bot, &self.website] {
            fs::create_dir_all(self.balances(side))?;
        }
        fs::write(
            self.balances(&self.bot).join("1-andy.txt"),
            "{\"user_id\":\"1-andy\",\"balance\":1280}\n",
        )?;
        fs::create_dir_all(self.bot_logs())?;
        fs::write(self.bot_logs().join("#cr0.log"), IRC_LOG)?;
        fs::create_dir_all(self.website.join("html"))?;
        fs::write(
            self.website.join("html/index.php"),
            b"<?php echo 'cr0 website';\n",
        )?;
        Ok(())
    }

    pub fn context(&self) -> Result<Context> {
        let location = Location {
            root: Some(self.root.clone()),
            config: None,
        };
        Context::load(&location, Duration::ZERO)
    }
}

/// Makes `dir` ready: absent, empty, or an earlier demo (which is removed).
fn prepare_dir(dir: &Path) -> Result<()> {
    if dir.join(MARKER).exists() {
        fs::remove_dir_all(dir)
            .with_context(|| format!("cannot remove the earlier demo in {}", dir.display()))?;
    } else if dir.exists() && fs::read_dir(dir)?.next().is_some() {
        anyhow::bail!(
            "{} exists and is not a cr0sync demo directory. Try: cr0sync demo --dir NEW_DIR",
            dir.display()
        );
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

fn create_db(path: &Path, sql: &str) -> Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    let conn = rusqlite::Connection::open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    conn.execute_batch(sql)
        .with_context(|| format!("fixture SQL for {}", path.display()))?;
    Ok(())
}

/// The database part: a first sync, then both sides write (the same user renamed on both,
/// coins added on both; in the site database, two users registered under one id), and two
/// syncs merge them: a conflict, a counter merge, an id collision kept, backups; the
/// operator then resolves the conflicts with `db resolve`.
fn database_part(demo: &Demo, ctx: &Context, out: &mut String) -> Result<()> {
    let sync = |out: &mut String, title: &str| -> Result<()> {
        let mut reports = Vec::new();
        run_job(ctx, Job::Database, Trigger::Manual, false, |run| {
            reports =
                crate::db::job::sync_pairs(run, &crate::db::job::Selection::default(), false)?;
            Ok(())
        })?;
        out.push_str(&format!("$ cr0sync db sync   # {title}\n"));
        out.push_str(&crate::db::job::sync_table(&reports).render());
        out.push('\n');
        Ok(())
    };
    sync(
        out,
        "first sync: the central copy is created from the bot's",
    )?;
    create_db(&demo.bot_db(), BOT_CHANGES)?;
    create_db(&demo.website_db(), WEBSITE_CHANGES)?;
    create_db(&demo.site_db(&demo.bot), &register("dave"))?;
    create_db(&demo.site_db(&demo.website), &register("erin"))?;
    out.push_str(
        "the bot renames carol and adds 30 coins to bob; the website renames carol too,\n\
         adds 20 coins to bob and changes alice's email\n\
         in the site database the bot registers dave and the website erin: both get user id 3\n\
         and post id 3\n\n",
    );
    sync(
        out,
        "merge: cell by cell, coins added up, the rename is a conflict",
    )?;
    sync(out, "the bot pair picks up what the website pair brought")?;
    let conn = rusqlite::Connection::open(ctx.layout.central_db("users"))?;
    let bob: i64 = conn.query_row("SELECT coins FROM users WHERE nick = 'bob'", [], |r| {
        r.get(0)
    })?;
    out.push_str(&format!(
        "bob's coins: 50 + 30 (bot) + 20 (website) = {bob} on every side\n"
    ));
    let site = rusqlite::Connection::open(ctx.layout.central_db("site"))?;
    let who: Vec<String> = site
        .prepare(
            "SELECT u.id || ' ' || u.nick || ' (post ' || p.id || ')' FROM users AS u \
             JOIN posts AS p ON p.user_id = u.id WHERE u.id > 2 ORDER BY u.id",
        )?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let found: i64 = site.query_row(
        "SELECT rowid FROM posts_fts WHERE posts_fts MATCH 'erin'",
        [],
        |r| r.get(0),
    )?;
    out.push_str(&format!(
        "site: both registrations kept on every side: user {}; a search for erin finds \
         post {found}\n",
        who.join(", user ")
    ));
    for c in crate::conflicts::open(ctx)? {
        // The operator reviews each conflict: a moved id is acknowledged (both rows were
        // kept); for carol's name the website's is kept after all.
        let (side, flag) = match &c.new_key {
            Some(new_key) => {
                out.push_str(&format!(
                    "conflict in {} table {} key {}: both rows kept, the website's under key \
                     {new_key} (rekey)\n",
                    c.database, c.table, c.key
                ));
                (None, "--ack")
            }
            None => {
                out.push_str(&format!(
                    "conflict in {} table {} key {}: {} wins; the losing row is kept in \
                     state/conflicts.jsonl (cr0sync db conflicts)\n",
                    c.database, c.table, c.key, c.winner
                ));
                (Some("peer"), "--keep peer")
            }
        };
        let mut line = String::new();
        run_job(ctx, Job::Database, Trigger::Manual, false, |run| {
            line = crate::db::job::resolve(run, &c.id, side)?;
            Ok(())
        })?;
        out.push_str(&format!("$ cr0sync db resolve {} {flag}\n{line}\n", c.id));
    }
    sync(out, "the kept row reaches every side")?;
    for b in crate::db::backup::list(ctx, "users")? {
        out.push_str(&format!("backup: {}\n", b.path.display()));
    }
    out.push('\n');
    Ok(())
}

/// The log part: the bot's channel log is copied, the bot rotates it (rename, as
/// logrotate's `create` does) and writes on, and the next run finishes the old file
/// before starting the new one: every line exactly once.
fn logs_part(demo: &Demo, ctx: &Context, out: &mut String) -> Result<()> {
    let sync = |out: &mut String| -> Result<()> {
        let report = run_job(ctx, Job::Logs, Trigger::Manual, false, |run| {
            crate::logs::job::sync_streams(run, true);
            Ok(())
        })?;
        for t in &report.tasks {
            out.push_str(&format!(
                "$ cr0sync logs sync   # {}: {}\n",
                t.name, t.detail
            ));
        }
        Ok(())
    };
    let live = demo.bot_logs().join("#cr0.log");
    let append = |path: &Path, text: &str| -> Result<()> {
        use std::io::Write;
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        f.write_all(text.as_bytes())?;
        Ok(())
    };
    sync(out)?;
    append(
        &live,
        "[2025-11-09 18:46:00] <bob> written just before the rotation\n",
    )?;
    fs::rename(&live, demo.bot_logs().join("#cr0.log.1"))?;
    append(
        &live,
        "[2025-11-09 18:47:00] <alice> first line of the new file\n",
    )?;
    out.push_str("the bot's log is rotated: #cr0.log -> #cr0.log.1, a new #cr0.log begins\n");
    sync(out)?;
    let copied = fs::read(ctx.layout.logs_dir().join("irc_networks/rizon/#cr0.log"))?;
    let mut source = fs::read(demo.bot_logs().join("#cr0.log.1"))?;
    source.extend(fs::read(&live)?);
    out.push_str(&format!(
        "central copy: {} lines, {} the old and the new source together, each line once\n\n",
        copied.iter().filter(|&&b| b == b'\n').count(),
        if copied == source { "exactly" } else { "NOT" }
    ));
    Ok(())
}

/// The security part: a baseline of the website, a tampered file found (once), accepted
/// by the operator; expired API sessions removed in place.
fn security_part(demo: &Demo, ctx: &Context, out: &mut String) -> Result<()> {
    use crate::security::{integrity, sessions};
    let sessions_file = ctx.layout.api_sessions();
    fs::write(
        &sessions_file,
        "{\n  \"sessions\": {\n    \"s1\": { \"user\": \"alice\", \"expires_at\": \"2020-01-01T00:00:00Z\" },\n    \
         \"s2\": { \"user\": \"bob\", \"expires_at\": \"2099-01-01T00:00:00Z\" }\n  },\n  \
         \"rate_limits\": {\n    \"203.0.113.7\": { \"count\": 41, \"window_start\": \"2020-01-01T00:00:00Z\", \"window_seconds\": 60 }\n  }\n}\n",
    )?;
    let page = demo.website.join("html/index.php");
    let mut found = Vec::new();
    run_job(ctx, Job::Security, Trigger::Manual, false, |run| {
        let (n, _) = integrity::baseline(run.ctx, None, run.now)?;
        out.push_str(&format!(
            "$ cr0sync security baseline   # {n} file(s) recorded, signed\n"
        ));
        fs::write(&page, "<?php echo 'cr0 website'; eval($_GET['x']);\n")?;
        out.push_str("someone edits website/html/index.php\n");
        let report = integrity::check(run.ctx, false, run.now)?;
        for f in report.new_findings() {
            found.push(format!("  {} {}", f.kind, f.path));
        }
        let again = integrity::check(run.ctx, false, run.now)?;
        out.push_str(&format!(
            "$ cr0sync security check   # exit 4, {} new finding(s):\n{}\n\
             a second check reports it again as open but not new ({} new): cron mails once\n",
            found.len(),
            found.join("\n"),
            again.new_findings().count()
        ));
        integrity::baseline(run.ctx, Some(&page), run.now)?;
        out.push_str("$ cr0sync security baseline --accept .../index.php   # the operator made that change\n");
        let c = sessions::cleanup(run.ctx, false, run.now)?;
        out.push_str(&format!(
            "$ cr0sync security cleanup-sessions   # removed {} expired session(s), {} rate-limit \
             window(s); {} session(s) active; the file was rewritten in place\n\n",
            c.sessions_expired, c.rate_limits_expired, c.sessions_active
        ));
        Ok(())
    })?;
    Ok(())
}

/// The file-tree part: a balance file per user on two sites; in the same minute one site
/// adds 20 coins and the other takes 10; the sync merges the JSON key by key and both
/// deltas count.
fn files_part(demo: &Demo, ctx: &Context, out: &mut String) -> Result<()> {
    let sync = |out: &mut String, title: &str| -> Result<()> {
        let mut reports = Vec::new();
        run_job(ctx, Job::Files, Trigger::Manual, false, |run| {
            reports = crate::files::job::sync_pairs(
                run,
                &crate::files::job::Selection::default(),
                false,
            )?;
            Ok(())
        })?;
        out.push_str(&format!("$ cr0sync files sync   # {title}\n"));
        out.push_str(&crate::files::job::sync_table(&reports).render());
        Ok(())
    };
    sync(
        out,
        "andy's balance file reaches the central store and the website",
    )?;
    sync(out, "and the bot pair settles")?;
    let set = |side: &Path, balance: i64| {
        fs::write(
            demo.balances(side).join("1-andy.txt"),
            format!("{{\"user_id\":\"1-andy\",\"balance\":{balance}}}\n"),
        )
    };
    set(&demo.bot, 1300)?;
    set(&demo.website, 1270)?;
    out.push_str(
        "in the same minute the bot adds 20 coins to andy (1280 -> 1300) and the website takes \
         10 (1280 -> 1270)\n",
    );
    sync(out, "merged key by key: balance is a json counter")?;
    sync(out, "the bot pair picks up the website's part")?;
    let mut seen = Vec::new();
    for dir in [
        ctx.resolve(Path::new("shared_storage/userdata/balances")),
        demo.balances(&demo.bot),
        demo.balances(&demo.website),
    ] {
        let text = fs::read_to_string(dir.join("1-andy.txt"))?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        seen.push(v["balance"].as_i64().unwrap_or_default());
    }
    out.push_str(&format!(
        "andy's balance: 1280 + 20 - 10 = {} (central, bot, website: {:?})\n\n",
        seen[0], seen
    ));
    Ok(())
}

/// A throwaway sshd for the demo's peer on "another host": 127.0.0.1, a free port, host
/// and user keys generated in the demo directory, the current user let in with that key
/// only. Killed when dropped.
struct DemoSshd {
    child: std::process::Child,
    port: u16,
    user: String,
    key: PathBuf,
}

impl Drop for DemoSshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_sshd(dir: &Path) -> Result<DemoSshd> {
    use std::process::{Command, Stdio};
    let sshd = Path::new("/usr/sbin/sshd");
    anyhow::ensure!(
        sshd.exists(),
        "no /usr/sbin/sshd (Debian: apt-get install openssh-server)"
    );
    let quiet = |cmd: &mut Command| -> Result<()> {
        let out = cmd
            .output()
            .with_context(|| format!("cannot run {cmd:?}"))?;
        anyhow::ensure!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    };
    let user = String::from_utf8(Command::new("id").arg("-un").output()?.stdout)?
        .trim()
        .to_string();
    let d = dir.join("sshd");
    fs::create_dir_all(&d)?;
    for key in ["host_key", "user_key"] {
        quiet(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(d.join(key)),
        )?;
    }
    fs::copy(d.join("user_key.pub"), d.join("authorized_keys"))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    fs::write(
        d.join("sshd_config"),
        format!(
            "ListenAddress 127.0.0.1\nPort {port}\nHostKey {}\nAuthorizedKeysFile {}\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
             StrictModes no\nPidFile none\nAllowUsers {user}\nPermitRootLogin prohibit-password\n\
             LogLevel ERROR\n",
            d.join("host_key").display(),
            d.join("authorized_keys").display()
        ),
    )?;
    // sshd's privilege separation directory (Debian creates it at boot).
    let _ = fs::create_dir_all("/run/sshd");
    let child = Command::new(sshd)
        .args(["-D", "-e", "-f"])
        .arg(d.join("sshd_config"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(d.join("sshd.log"))?)
        .spawn()
        .context("cannot start /usr/sbin/sshd")?;
    let mut s = DemoSshd {
        child,
        port,
        user,
        key: d.join("user_key"),
    };
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(s);
        }
        if let Ok(Some(_)) = s.child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = fs::read_to_string(d.join("sshd.log")).unwrap_or_default();
    anyhow::bail!(
        "sshd did not start: {}",
        log.lines().last().unwrap_or("no message")
    )
}

/// The remote part: a balance directory on "another host" (reached over ssh, served by
/// `cr0sync serve` there) synced with a central store of its own. When no sshd can be
/// started here (not installed, not allowed), it says so and what it skipped.
fn remote_part(demo: &Demo, out: &mut String) -> Result<()> {
    let sshd = match start_sshd(&demo.dir) {
        Ok(s) => s,
        Err(e) => {
            out.push_str(&format!(
                "peer on another host: skipped, no sshd could be started here ({e:#}); the \
                 README's \"Peers on other hosts\" shows the setup\n\n"
            ));
            return Ok(());
        }
    };
    let remote_root = demo.dir.join("remote-root");
    let mirror = demo.dir.join("mirror/userdata/balances");
    fs::create_dir_all(&mirror)?;
    fs::write(
        mirror.join("2-bob.txt"),
        "{\"user_id\":\"2-bob\",\"balance\":75}\n",
    )?;
    let location = Location {
        root: Some(remote_root.clone()),
        config: None,
    };
    crate::init::init(&location)?;
    let exe = std::env::current_exe().context("cannot find this program")?;
    let url = format!(
        "ssh://{}@127.0.0.1:{}{}",
        sshd.user,
        sshd.port,
        mirror.display()
    );
    let config = format!(
        "[remote]\nssh = [\"ssh\", \"-F\", \"/dev/null\", \"-i\", \"{key}\", \"-o\", \"BatchMode=yes\", \
         \"-o\", \"StrictHostKeyChecking=no\", \"-o\", \"UserKnownHostsFile=/dev/null\", \"-o\", \
         \"LogLevel=ERROR\"]\nremote_bin = \"{exe}\"\n\n\
         [[files.tree]]\nname = \"balances\"\ncentral = \"shared_storage/userdata/balances\"\n\
         json_counters = [\"balance\"]\npeers = [{{ name = \"mirror\", path = \"{url}\" }}]\n",
        key = sshd.key.display(),
        exe = exe.display(),
    );
    crate::fsutil::atomic_write(
        &remote_root.join("cr0sync.toml"),
        config.as_bytes(),
        0o664,
        &crate::fsutil::Perms::default(),
    )?;
    let ctx = Context::load(&location, Duration::ZERO)?;
    let central = ctx.resolve(Path::new("shared_storage/userdata/balances"));
    fs::create_dir_all(&central)?;
    fs::write(
        central.join("1-andy.txt"),
        "{\"user_id\":\"1-andy\",\"balance\":1290}\n",
    )?;
    let mut reports = Vec::new();
    let result = run_job(&ctx, Job::Files, Trigger::Manual, false, |run| {
        reports =
            crate::files::job::sync_pairs(run, &crate::files::job::Selection::default(), false)?;
        Ok(())
    });
    out.push_str(&format!(
        "a peer on another host: a throwaway sshd on 127.0.0.1:{} lets this user in with a \
         throwaway key; the store {} syncs its balances with {url}\n",
        sshd.port,
        remote_root.display()
    ));
    out.push_str("$ cr0sync files sync   # ssh runs `cr0sync serve` on that host\n");
    match result {
        Ok(_) if reports.iter().all(|r| r.files > 0) => {
            out.push_str(&crate::files::job::sync_table(&reports).render());
            let both = ["1-andy.txt", "2-bob.txt"]
                .iter()
                .all(|f| central.join(f).exists() && mirror.join(f).exists());
            out.push_str(&format!(
                "both balance files are on both sides: {}\n\n",
                if both { "yes" } else { "NO" }
            ));
        }
        Ok(_) => out.push_str("the sync over ssh did not finish; see cr0sync status\n\n"),
        Err(e) => out.push_str(&format!("the sync over ssh failed: {e:#}\n\n")),
    }
    drop(sshd);
    Ok(())
}

/// Builds the demo, runs each job once as cron would, and returns the narrative and the
/// final status for printing.
pub fn run(dir: &Path) -> Result<String> {
    let demo = Demo::new(dir);
    demo.build()?;
    let mut out = format!(
        "demo directory {}\n  central store  {}\n  bot side       {}\n  website side   {}\n\n",
        demo.dir.display(),
        demo.root.display(),
        demo.bot.display(),
        demo.website.display()
    );
    let ctx = demo.context()?;
    database_part(&demo, &ctx, &mut out)?;
    logs_part(&demo, &ctx, &mut out)?;
    files_part(&demo, &ctx, &mut out)?;
    remote_part(&demo, &mut out)?;
    security_part(&demo, &ctx, &mut out)?;
    for job in Job::ALL {
        let result = run_job(&ctx, job, Trigger::Cron, false, |run| job.cron(run));
        let line = match result {
            Ok(report) => format!("ran cron {job}: ok, {} task(s)", report.tasks.len()),
            Err(e) => format!("ran cron {job}: failed: {e:#}"),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str(&format!(
        "\n$ cr0sync --root {} status\n",
        demo.root.display()
    ));
    out.push_str(&status::collect(&ctx)?.to_human());
    out.push_str(NEXT_STEPS);
    Ok(out)
}

/// What to do after the demo, on a real server.
const NEXT_STEPS: &str = "
Next, on your server:
  1. install the binary:    sudo install -m 755 target/release/cr0sync /usr/local/bin/
  2. create the store:      sudo cr0sync --root /data/cr0_system init
  3. describe your data:    edit /data/cr0_system/cr0sync.toml (databases and their peers,
                            log streams, the paths to watch; every key is commented)
  4. try it without writes: cr0sync --root /data/cr0_system db sync --dry-run
  5. run it every minute:   install/install_crontabs.sh --user cr0 --root /data/cr0_system
                            (or the systemd units in install/), then install/test_cron_scripts.sh
  6. watch it:              cr0sync --root /data/cr0_system status --check
";
