// The log job's end-to-end cases, included by tests/logs.rs (local sources) and
// tests/logs_remote.rs (the same sources behind ssh), which set `REMOTE`.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

use common::{Root, stderr_of};

struct Setup {
    r: Root,
    src: PathBuf,
    /// The sshd the stream's `from` goes through when `REMOTE`.
    _sshd: Option<common::sshd::Sshd>,
}

const LOG: &str = "#cr0.log";

impl Setup {
    /// `None` where a `REMOTE` run cannot start its sshd (not root; noted on stderr).
    fn new(extra: &str) -> Option<Setup> {
        let r = Root::new();
        let (src, from, remote, sshd) = if REMOTE {
            let sshd = common::sshd::Sshd::start("")?;
            // A directory of the remote user; the test writes it as root, files 0644.
            let src = sshd.user_dir("src");
            (src.clone(), sshd.url(&src), sshd.remote_section(), Some(sshd))
        } else {
            let src = r.tmp.path().join("src");
            std::fs::create_dir(&src).unwrap();
            (src.clone(), src.display().to_string(), String::new(), None)
        };
        r.write_config(&format!(
            "{remote}[logs]\nrotate_size = \"1KiB\"\nrotate_keep = 3\n{extra}\n\
             [[logs.stream]]\nname = \"rizon\"\nfrom = \"{from}\"\nto = \"logs/irc_networks/rizon\"\n",
        ));
        Some(Setup {
            r,
            src,
            _sshd: sshd,
        })
    }

    fn source(&self, name: &str) -> PathBuf {
        self.src.join(name)
    }

    fn dest(&self, name: &str) -> PathBuf {
        self.r.path("logs/irc_networks/rizon").join(name)
    }

    fn append(&self, name: &str, bytes: &[u8]) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.source(name))
            .unwrap();
        f.write_all(bytes).unwrap();
    }

    fn run(&self, args: &[&str]) -> String {
        let out = self.r.cmd().args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", stderr_of(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    fn sync(&self) -> String {
        self.run(&["logs", "sync"])
    }

    fn dest_bytes(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dest(name)).unwrap_or_default()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.r.path("logs/cron_log_sync.log")).unwrap_or_default()
    }
}

fn line(i: usize) -> String {
    format!(
        "[2025-11-09 18:45:{:02}] <nick{}> message number {i}\n",
        i % 60,
        i % 7
    )
}

#[test]
fn complete_lines_only_bytes_as_they_are() {
    let Some(s) = Setup::new("") else { return };
    let long = vec![b'x'; 3 << 20];
    let mut bytes = b"ok\r\n\xff\xfe invalid utf-8\n".to_vec();
    bytes.extend_from_slice(&long);
    bytes.extend_from_slice(b"\nthen a partial");
    s.append(LOG, &bytes);
    s.sync();
    let want_len = bytes.len() - b"then a partial".len();
    assert_eq!(s.dest_bytes(LOG), &bytes[..want_len], "partial line waits");
    s.append(LOG, b" line\n");
    s.sync();
    bytes.extend_from_slice(b" line\n");
    assert_eq!(s.dest_bytes(LOG), bytes);
    if REMOTE {
        // The bytes came over the connection, compressed (3 MiB of one letter).
        let log = s.log_text();
        let received: Vec<u64> = log
            .lines()
            .filter(|l| l.contains("bytes sent,"))
            .filter_map(|l| l.split(" bytes sent, ").nth(1)?.split(' ').next()?.parse().ok())
            .collect();
        assert_eq!(received.len(), 2, "one connection per run: {log}");
        assert!(received[0] > 100 && received[0] < 1 << 20, "{received:?}");
    }
    // Nothing new: nothing copied, the source is not even opened (fast path).
    assert!(s.sync().contains("0 byte(s) copied, 1 unchanged"));
    assert!(!s.run(&["logs", "sync-all"]).contains("unchanged"));
    assert_eq!(s.dest_bytes(LOG), bytes);
}

#[test]
fn rename_rotation_finishes_the_old_file_then_copies_the_new_one() {
    let Some(s) = Setup::new("") else { return };
    s.append(LOG, line(1).as_bytes());
    s.sync();
    s.append(LOG, line(2).as_bytes());
    std::fs::rename(s.source(LOG), s.source(&format!("{LOG}.1"))).unwrap();
    s.append(LOG, line(3).as_bytes());
    s.sync();
    assert_eq!(
        String::from_utf8(s.dest_bytes(LOG)).unwrap(),
        line(1) + &line(2) + &line(3)
    );
}

#[test]
fn a_rotation_compressed_before_the_next_run_is_finished_from_the_gz() {
    let Some(s) = Setup::new("") else { return };
    s.append(LOG, line(1).as_bytes());
    s.sync();
    s.append(LOG, line(2).as_bytes());
    let old = s.source(&format!("{LOG}.1"));
    std::fs::rename(s.source(LOG), &old).unwrap();
    assert!(Command::new("gzip").arg(&old).status().unwrap().success());
    s.append(LOG, line(3).as_bytes());
    let out = s.sync();
    assert!(!out.contains("could not be finished"), "{out}");
    assert!(
        s.log_text().contains("from its compressed copy"),
        "{}",
        s.log_text()
    );
    assert_eq!(
        String::from_utf8(s.dest_bytes(LOG)).unwrap(),
        line(1) + &line(2) + &line(3)
    );
}

#[test]
fn a_rotation_removed_before_the_next_run_is_lost_and_status_says_so() {
    let Some(s) = Setup::new("") else { return };
    s.append(LOG, line(1).as_bytes());
    s.sync();
    s.append(LOG, line(2).as_bytes());
    let old = s.source(&format!("{LOG}.1"));
    std::fs::rename(s.source(LOG), &old).unwrap();
    std::fs::remove_file(&old).unwrap();
    s.append(LOG, line(3).as_bytes());
    let out = s.sync();
    assert!(out.contains("could not be finished"), "{out}");
    assert_eq!(
        String::from_utf8(s.dest_bytes(LOG)).unwrap(),
        line(1) + &line(3)
    );
    // Never silent: status names the stream until a week has passed.
    let out = s.r.cmd().args(["status", "--check"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("lost content"), "{text}");
    let st = s.r.status_json();
    assert!(st["streams"][0]["last_loss"].is_string(), "{st}");
}

#[test]
fn a_writer_that_keeps_the_rotated_file_open_is_followed_until_it_reopens() {
    use std::io::Write;
    let Some(s) = Setup::new("") else { return };
    // The logger keeps its descriptor; logrotate renames the file and creates a new one;
    // the logger reopens only later (Limnoria's ChannelLogger does).
    let mut logger = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(s.source(LOG))
        .unwrap();
    logger.write_all(line(1).as_bytes()).unwrap();
    s.sync();
    logger.write_all(line(2).as_bytes()).unwrap();
    std::fs::rename(s.source(LOG), s.source(&format!("{LOG}.1"))).unwrap();
    std::fs::File::create(s.source(LOG)).unwrap();
    s.sync();
    // Still writing into the renamed file, for two more runs.
    logger.write_all(line(3).as_bytes()).unwrap();
    s.sync();
    logger.write_all(line(4).as_bytes()).unwrap();
    s.sync();
    // It reopens; the rotated file is compressed later.
    drop(logger);
    s.append(LOG, line(5).as_bytes());
    s.sync();
    assert!(
        Command::new("gzip")
            .arg(s.source(&format!("{LOG}.1")))
            .status()
            .unwrap()
            .success()
    );
    s.sync();
    let mut got: Vec<String> = String::from_utf8(s.dest_bytes(LOG))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    got.sort();
    let mut want: Vec<String> = (1..=5).map(|i| line(i).trim_end().to_string()).collect();
    want.sort();
    assert_eq!(got, want, "every line exactly once");
    assert!(s.log_text().contains("grew; "), "{}", s.log_text());
}

#[test]
fn truncation_in_place_copytruncate_and_shell_redirect() {
    let Some(s) = Setup::new("") else { return };
    s.append(LOG, line(1).as_bytes());
    s.sync();
    // copytruncate: the copy holds what was written since the last run.
    s.append(LOG, line(2).as_bytes());
    std::fs::copy(s.source(LOG), s.source(&format!("{LOG}.1"))).unwrap();
    std::fs::File::create(s.source(LOG)).unwrap();
    s.append(LOG, line(3).as_bytes());
    s.sync();
    // `> file` with nothing new before it, then a longer rewrite.
    std::fs::File::create(s.source(LOG)).unwrap();
    s.append(LOG, (line(4) + &line(5) + &line(6)).as_bytes());
    s.sync();
    let want: String = (1..=6).map(line).collect();
    assert_eq!(String::from_utf8(s.dest_bytes(LOG)).unwrap(), want);
}

fn logrotate(s: &Setup, mode: &str) {
    let conf = s.r.tmp.path().join("logrotate.conf");
    std::fs::write(
        &conf,
        format!(
            "\"{}/*.log\" {{\n  rotate 5\n  {mode}\n  missingok\n}}\n",
            s.src.display()
        ),
    )
    .unwrap();
    let state = s.r.tmp.path().join("logrotate.state");
    let out = Command::new("logrotate")
        .arg("-f")
        .arg("-s")
        .arg(&state)
        .arg(&conf)
        .output()
        .expect("logrotate (apt install logrotate)");
    assert!(out.status.success(), "logrotate: {}", stderr_of(&out));
}

#[test]
fn real_logrotate_in_create_copytruncate_compress_and_delaycompress_modes() {
    for mode in [
        "create",
        "copytruncate",
        "create\n  compress",
        "create\n  compress\n  delaycompress",
        "copytruncate\n  compress",
    ] {
        let Some(s) = Setup::new("") else { return };
        // cr0sync has seen the file before the first rotation.
        let mut want = line(99);
        s.append(LOG, want.as_bytes());
        s.sync();
        for round in 0..4 {
            for i in 0..5 {
                let l = line(round * 10 + i);
                s.append(LOG, l.as_bytes());
                want.push_str(&l);
            }
            if round % 2 == 1 {
                s.sync();
            }
            logrotate(&s, mode);
            let l = line(round * 10 + 9);
            s.append(LOG, l.as_bytes());
            want.push_str(&l);
            s.sync();
        }
        assert_eq!(
            String::from_utf8(s.dest_bytes(LOG)).unwrap(),
            want,
            "{mode}"
        );
    }
}

#[test]
fn vanished_sources_keep_their_checkpoint_for_seven_days() {
    let Some(s) = Setup::new("") else { return };
    s.append("gone.log", line(1).as_bytes());
    s.sync();
    std::fs::remove_file(s.source("gone.log")).unwrap();
    let state = || std::fs::read_to_string(s.r.path("state/logs/rizon.json")).unwrap();
    let at = |t: &str| {
        let out =
            s.r.cmd()
                .env("CR0SYNC_NOW", t)
                .args(["logs", "sync"])
                .output()
                .unwrap();
        assert!(out.status.success(), "{}", stderr_of(&out));
    };
    at("2030-01-01T00:00:00Z");
    assert!(state().contains("gone.log"));
    at("2030-01-07T00:00:00Z");
    assert!(state().contains("gone.log"), "6 days: kept");
    at("2030-01-08T00:00:01Z");
    assert!(!state().contains("gone.log"), "7 days: dropped");
}

#[test]
fn rotate_compresses_shifts_and_keeps_everything_copied() {
    let Some(s) = Setup::new("") else { return };
    let mut want = Vec::new();
    let mut round = |n: usize| {
        for i in 0..30 {
            let l = line(n * 100 + i);
            s.append(LOG, l.as_bytes());
            want.extend_from_slice(l.as_bytes());
        }
        s.sync();
        let out = s.run(&["logs", "rotate", "--dry-run"]);
        assert!(out.contains("would rotate"), "{out}");
        let out = s.run(&["logs", "rotate"]);
        assert!(out.contains("1 file(s) rotated"), "{out}");
    };
    for n in 0..3 {
        round(n);
    }
    s.append(LOG, line(999).as_bytes());
    want.extend_from_slice(line(999).as_bytes());
    s.sync();
    // Rotations oldest first, then the live file: exactly everything copied. Each passes
    // gzip -t.
    let rotations = |s: &Setup| -> Vec<u8> {
        let mut have = Vec::new();
        for n in (1..=3).rev() {
            let gz = s.dest(&format!("{LOG}.{n}.gz"));
            assert!(
                Command::new("gzip")
                    .arg("-t")
                    .arg(&gz)
                    .status()
                    .unwrap()
                    .success()
            );
            let out = Command::new("gzip").arg("-dc").arg(&gz).output().unwrap();
            have.extend_from_slice(&out.stdout);
        }
        have.extend_from_slice(&s.dest_bytes(LOG));
        have
    };
    assert_eq!(rotations(&s), want);
    // rotate_keep = 3: a fourth rotation drops the oldest.
    let oldest = Command::new("gzip")
        .arg("-dc")
        .arg(s.dest(&format!("{LOG}.3.gz")))
        .output()
        .unwrap()
        .stdout;
    for i in 0..30 {
        s.append(LOG, line(500 + i).as_bytes());
    }
    s.sync();
    s.run(&["logs", "rotate"]);
    assert!(!s.dest(&format!("{LOG}.4.gz")).exists());
    let kept = rotations(&s);
    assert!(!kept.starts_with(&oldest) && kept.ends_with(b"\n"));
}

#[test]
fn sigkill_during_the_copy_of_a_large_source_then_one_run_leaves_it_exact() {
    let Some(s) = Setup::new("") else { return };
    // A checkpoint exists, then ~60 MB of new lines arrive, so a copy takes a while.
    s.append(LOG, line(0).as_bytes());
    s.sync();
    {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(s.source(LOG))
            .unwrap();
        let mut f = std::io::BufWriter::new(file);
        // Over ssh each run starts a connection first: less data, coarser steps.
        for i in 0..if REMOTE { 200_000 } else { 1_000_000 } {
            f.write_all(line(i).as_bytes()).unwrap();
        }
    }
    // The source keeps growing between kills.
    let killed = common::kill_at_later_and_later_moments(
        &s.r.root,
        &["logs", "sync-all"],
        std::time::Duration::from_micros(if REMOTE { 10_000 } else { 300 }),
        2000,
        |round| s.append(LOG, line(2_000_000 + round as usize).as_bytes()),
    );
    eprintln!("{killed} runs killed");
    assert!(killed >= 10, "only {killed} runs were killed");
    let log = std::fs::read_to_string(s.r.path("logs/cron_log_sync.log")).unwrap_or_default();
    let cut = log.matches("cut back").count();
    eprintln!("{cut} runs cut back a destination");
    assert!(cut > 0, "no run was killed between appending and recording");
    s.sync();
    assert_eq!(s.dest_bytes(LOG), std::fs::read(s.source(LOG)).unwrap());
}

#[test]
fn cron_logs_is_silent_and_status_shows_the_stream() {
    let Some(s) = Setup::new("") else { return };
    s.append(LOG, line(1).as_bytes());
    s.append(LOG, b"partial");
    let out = s.r.cmd().args(["cron", "logs"]).output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "{}",
        stderr_of(&out)
    );
    let st = s.r.status_json();
    assert_eq!(st["streams"][0]["stream"], "rizon");
    assert_eq!(st["streams"][0]["files"], 1);
    assert_eq!(st["streams"][0]["bytes_behind"], 7);
    assert_eq!(st["streams"][0]["bytes_copied"], line(1).len());
    let schedule = std::fs::read_to_string(s.r.path("state/schedule/logs.json")).unwrap();
    assert!(schedule.contains("clean-rotations"), "{schedule}");
}

#[test]
fn daily_cleanup_removes_old_rotations_only() {
    let Some(s) = Setup::new("rotated_max_age = \"30d\"") else { return };
    let dir = s.r.path("logs/api");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, age_days) in [("a.log.1.gz", 40), ("a.log.2.gz", 10), ("a.log", 100)] {
        std::fs::write(dir.join(name), b"x").unwrap();
        let t = format!("{} days ago", age_days);
        assert!(
            Command::new("touch")
                .args(["-d", &t])
                .arg(dir.join(name))
                .status()
                .unwrap()
                .success()
        );
    }
    let out = s.r.cmd().args(["cron", "logs"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(!dir.join("a.log.1.gz").exists());
    assert!(dir.join("a.log.2.gz").exists() && dir.join("a.log").exists());
}

#[test]
fn a_stream_whose_directory_is_missing_fails_clearly_and_the_others_still_sync() {
    let Some(s) = Setup::new("") else { return };
    s.append(LOG, line(1).as_bytes());
    let cfg = std::fs::read_to_string(s.r.path("cr0sync.toml")).unwrap();
    s.r.write_config(&format!(
        "{cfg}\n[[logs.stream]]\nname = \"gone\"\nfrom = \"/nonexistent/logs\"\nto = \"logs/irc_networks/gone\"\n"
    ));
    let out = s.r.cmd().args(["logs", "sync"]).output().unwrap();
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("stream gone: cannot list /nonexistent/logs") && err.contains("Try:"),
        "{err}"
    );
    assert_eq!(
        s.dest_bytes(LOG),
        line(1).as_bytes(),
        "the healthy stream synced"
    );
    let st = s.r.status_json();
    assert!(st["problems"].to_string().contains("stream gone"), "{st}");
}

#[test]
fn content_rotated_away_between_two_runs_is_copied_exactly_once() {
    for mode in [
        "create",
        "create\n  compress",
        "create\n  compress\n  delaycompress",
        "copytruncate",
        "copytruncate\n  compress",
    ] {
        let Some(s) = Setup::new("") else { return };
        s.append(LOG, line(1).as_bytes());
        s.sync();
        // Two rotations before the next run: what the second file got was rotated away
        // before any run saw it.
        s.append(LOG, line(2).as_bytes());
        logrotate(&s, mode);
        s.append(LOG, (line(3) + &line(4)).as_bytes());
        logrotate(&s, mode);
        s.append(LOG, line(5).as_bytes());
        s.sync();
        s.sync();
        let want: String = (1..=5).map(line).collect();
        assert_eq!(
            String::from_utf8(s.dest_bytes(LOG)).unwrap(),
            want,
            "{mode}"
        );
    }
    // A source created and rotated away between two runs of a stream that ran before.
    let Some(s) = Setup::new("") else { return };
    s.append(LOG, line(1).as_bytes());
    s.sync();
    s.append("new.log", (line(10) + &line(11)).as_bytes());
    logrotate(&s, "create\n  compress\n  delaycompress");
    s.append("new.log", line(12).as_bytes());
    s.sync();
    s.sync();
    assert_eq!(
        String::from_utf8(s.dest_bytes("new.log")).unwrap(),
        line(10) + &line(11) + &line(12)
    );
}
