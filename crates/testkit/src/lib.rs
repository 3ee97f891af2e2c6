//! Real faults for tests, in one place so every suite injects them the same way: a disk
//! that fills up (a tmpfs of a set size), a network that partitions (a namespace whose
//! link is cut), a process that stops or dies (signals), and a wait that polls for a
//! condition up to a generous deadline instead of sleeping a guess.
//!
//! Mounting and namespaces need root, which CI has. Outside CI a test that cannot have
//! its fault skips with a printed reason; under `CI=true` it fails, so a missing fault
//! never passes silently.
//!
//! ```no_run
//! # fn demo() {
//! let Some(disk) = tessera_testkit::Tmpfs::mount_or_skip(3 << 20) else { return };
//! let filler = disk.fill();       // the disk is now full
//! disk.free(&filler);              // and has room again
//! # }
//! ```

pub mod otlp;
pub mod prometheus;

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A tmpfs of a fixed size, mounted on a fresh directory and unmounted on drop.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `bytes` bytes (rounded up to pages by the kernel).
    pub fn mount(bytes: u64) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={bytes},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed (needs root): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs { dir })
    }

    /// `mount`, or `None` with the reason printed when this machine cannot mount and the
    /// run is not CI. Under `CI=true` a failed mount panics.
    pub fn mount_or_skip(bytes: u64) -> Option<Tmpfs> {
        match Tmpfs::mount(bytes) {
            Ok(t) => Some(t),
            Err(e) if std::env::var_os("CI").is_some() => panic!("{e}"),
            Err(e) => {
                eprintln!("skipped: {e}");
                None
            }
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the remaining space with one file and returns its path; the next write of
    /// any size to this filesystem fails with ENOSPC.
    pub fn fill(&self) -> PathBuf {
        let path = self.dir.path().join(format!("filler-{}", unique_suffix()));
        let mut f = std::fs::File::create(&path).expect("create filler");
        let chunk = vec![0x5a_u8; 4096];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        // The last partial page: write byte by byte until nothing fits.
        while let Ok(1) = f.write(&[0x5a]) {}
        path
    }

    /// Removes a file made by `fill`, giving its space back.
    pub fn free(&self, filler: &Path) {
        std::fs::remove_file(filler).expect("remove filler");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy, so a process of the test still holding a file open cannot keep it mounted.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// A network namespace joined to the host by a veth pair: processes started in it
/// reach the host at [`Netns::host_ip`] and are reached at [`Netns::ip`], until
/// [`Netns::cut`] takes the link down. Packets are then dropped, not refused, as in a
/// real partition: connections time out. [`Netns::heal`] brings it back.
pub struct Netns {
    name: String,
    host_if: String,
    host_ip: String,
    ip: String,
}

impl Netns {
    pub fn create() -> Result<Netns, String> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) & 0xF;
        // A /30 of 10.64.0.0/10 per (process, namespace): tests run in parallel processes.
        let id = ((std::process::id() << 4) | n) & 0x3F_FFFF;
        let (a, b, c) = (64 + (id >> 14), (id >> 6) & 0xFF, (id & 0x3F) * 4);
        let netns = Netns {
            name: format!("tk{id}"),
            host_if: format!("tkh{id}"),
            host_ip: format!("10.{a}.{b}.{}", c + 1),
            ip: format!("10.{a}.{b}.{}", c + 2),
        };
        let ns_if = format!("tkn{id}");
        let (name, host_if) = (netns.name.as_str(), netns.host_if.as_str());
        let host_cidr = format!("{}/30", netns.host_ip);
        let ns_cidr = format!("{}/30", netns.ip);
        // Created before the steps that can fail, so Drop cleans up after any of them.
        ip(&["netns", "add", name])?;
        for step in [
            &[
                "link", "add", host_if, "type", "veth", "peer", "name", &ns_if,
            ][..],
            &["link", "set", &ns_if, "netns", name],
            &["addr", "add", &host_cidr, "dev", host_if],
            &["link", "set", host_if, "up"],
            &["-n", name, "addr", "add", &ns_cidr, "dev", &ns_if],
            &["-n", name, "link", "set", &ns_if, "up"],
            &["-n", name, "link", "set", "lo", "up"],
        ] {
            ip(step)?;
        }
        Ok(netns)
    }

    /// [`Netns::create`], or `None` with a printed reason outside CI.
    pub fn create_or_skip() -> Option<Netns> {
        match Netns::create() {
            Ok(n) => Some(n),
            Err(e) if std::env::var_os("CI").is_some() => panic!("{e}"),
            Err(e) => {
                eprintln!("skipped: {e}");
                None
            }
        }
    }

    /// `program` to be run inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// The host's address, as processes in the namespace reach it.
    pub fn host_ip(&self) -> &str {
        &self.host_ip
    }

    /// The namespace's address, as the host reaches it.
    pub fn ip(&self) -> &str {
        &self.ip
    }

    /// Partitions the namespace from the host.
    pub fn cut(&self) {
        ip(&["link", "set", &self.host_if, "down"]).expect("cut the link");
    }

    pub fn heal(&self) {
        ip(&["link", "set", &self.host_if, "up"]).expect("heal the link");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and with it the host's.
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_if]);
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip (iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn unique_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Sends `signal` (`"STOP"`, `"CONT"`, `"KILL"`, `"TERM"`...) to process `pid`.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// Polls `cond` every 20 ms until it holds, panicking with `what` after `deadline`. Waits
/// on real processes use this with a generous deadline: a loaded machine may slow a test,
/// never fail it.
pub async fn wait_until<F, Fut>(what: &str, deadline: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A real etcd cluster of `n` members on loopback ports, each its own process with its
/// own data dir, elections tuned fast (50 ms heartbeats, 500 ms election timeout). Needs
/// `etcd` and `etcdctl` on the PATH (Debian's `etcd-server` and `etcd-client`).
pub struct EtcdCluster {
    members: Vec<EtcdMember>,
    initial_cluster: String,
    /// With TLS on the client port: the PEM files in `_dir`.
    tls: Option<EtcdTls>,
    /// Another address the client ports listen on (a [`Netns`]'s host side).
    also_on: Option<String>,
    _dir: tempfile::TempDir,
}

/// The PEM files of a TLS etcd cluster: the CA, and a client certificate it signed
/// (the members demand one: `--client-cert-auth`).
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

impl EtcdTls {
    /// A new CA, a server certificate for 127.0.0.1 and a client certificate, in `dir`.
    fn generate(dir: &Path) -> Result<EtcdTls, String> {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let e = |e: rcgen::Error| e.to_string();
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca =
            CertifiedIssuer::self_signed(params, KeyPair::generate().map_err(e)?).map_err(e)?;
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text)
                .map(|()| path)
                .map_err(|e| e.to_string())
        };
        let leaf = |names: Vec<String>| -> Result<(String, String), String> {
            let key = KeyPair::generate().map_err(e)?;
            let cert = CertificateParams::new(names)
                .map_err(e)?
                .signed_by(&key, &ca)
                .map_err(e)?;
            Ok((cert.pem(), key.serialize_pem()))
        };
        let (server_pem, server_key) = leaf(vec!["127.0.0.1".into(), "localhost".into()])?;
        let (client_pem, client_key) = leaf(vec!["tessera-test-client".into()])?;
        Ok(EtcdTls {
            ca: write("ca.pem", ca.pem())?,
            cert: write("client.pem", client_pem)?,
            key: write("client.key", client_key)?,
            server_cert: write("server.pem", server_pem)?,
            server_key: write("server.key", server_key)?,
        })
    }
}

struct EtcdMember {
    name: String,
    client: String,
    peer: String,
    data: PathBuf,
    child: Option<std::process::Child>,
}

impl EtcdCluster {
    pub async fn start(n: usize) -> Result<EtcdCluster, String> {
        EtcdCluster::start_with(n, false, None).await
    }

    /// `n` members whose client ports also listen on `ip` (e.g. [`Netns::host_ip`], for
    /// servers in the namespace), or `None` with a printed reason outside CI.
    pub async fn start_on_or_skip(n: usize, ip: &str) -> Option<EtcdCluster> {
        EtcdCluster::or_skip(EtcdCluster::start_with(n, false, Some(ip.to_owned())).await)
    }

    /// The client addresses on the extra IP given to [`EtcdCluster::start_on_or_skip`].
    pub fn client_addrs_on(&self, ip: &str) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("{ip}:{}", m.client.rsplit(':').next().unwrap_or_default()))
            .collect()
    }

    /// `n` members serving TLS on their client ports, with client certificates required.
    pub async fn start_tls(n: usize) -> Result<EtcdCluster, String> {
        EtcdCluster::start_with(n, true, None).await
    }

    async fn start_with(
        n: usize,
        tls: bool,
        also_on: Option<String>,
    ) -> Result<EtcdCluster, String> {
        for tool in ["etcd", "etcdctl"] {
            Command::new(tool).arg("--version").output().map_err(|e| {
                format!("{tool} is not installed (apt-get install etcd-server etcd-client): {e}")
            })?;
        }
        // Ports are picked free and then released, so another process (an outgoing
        // connection's ephemeral port) can take one before etcd binds it; a cluster whose
        // member could not start is started again on new ports.
        let mut failed = String::new();
        for _ in 0..3 {
            match EtcdCluster::try_start(n, tls, also_on.clone()).await {
                Ok(c) => return Ok(c),
                Err(e) => {
                    eprintln!("etcd cluster did not start, trying new ports: {e}");
                    failed = e;
                }
            }
        }
        Err(failed)
    }

    async fn try_start(
        n: usize,
        tls: bool,
        also_on: Option<String>,
    ) -> Result<EtcdCluster, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut members = Vec::new();
        for i in 0..n {
            members.push(EtcdMember {
                name: format!("m{i}"),
                client: format!("127.0.0.1:{}", free_port()?),
                peer: format!("127.0.0.1:{}", free_port()?),
                data: dir.path().join(format!("m{i}")),
                child: None,
            });
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let tls = if tls {
            Some(EtcdTls::generate(dir.path())?)
        } else {
            None
        };
        let mut cluster = EtcdCluster {
            members,
            initial_cluster,
            tls,
            also_on,
            _dir: dir,
        };
        for i in 0..n {
            cluster.spawn(i, "new")?;
        }
        cluster.wait_healthy().await?;
        Ok(cluster)
    }

    /// [`EtcdCluster::start`], or `None` with a printed reason outside CI.
    pub async fn start_or_skip(n: usize) -> Option<EtcdCluster> {
        EtcdCluster::or_skip(EtcdCluster::start(n).await)
    }

    /// [`EtcdCluster::start_tls`], or `None` with a printed reason outside CI.
    pub async fn start_tls_or_skip(n: usize) -> Option<EtcdCluster> {
        EtcdCluster::or_skip(EtcdCluster::start_tls(n).await)
    }

    /// The TLS files clients need, for a cluster started with TLS.
    pub fn tls(&self) -> Option<&EtcdTls> {
        self.tls.as_ref()
    }

    fn or_skip(started: Result<EtcdCluster, String>) -> Option<EtcdCluster> {
        match started {
            Ok(c) => Some(c),
            Err(e) if std::env::var_os("CI").is_some() => panic!("{e}"),
            Err(e) => {
                eprintln!("skipped: {e}");
                None
            }
        }
    }

    fn spawn(&mut self, i: usize, state: &str) -> Result<(), String> {
        let m = &mut self.members[i];
        let log = std::fs::File::create(m.data.with_extension("log")).map_err(|e| e.to_string())?;
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut listen = format!("{scheme}://{}", m.client);
        if let Some(ip) = &self.also_on {
            let port = m.client.rsplit(':').next().unwrap_or_default();
            listen.push_str(&format!(",{scheme}://{ip}:{port}"));
        }
        let mut cmd = Command::new("etcd");
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", &m.name, "--data-dir"])
            .arg(&m.data)
            .args([
                "--listen-client-urls",
                &listen,
                "--advertise-client-urls",
                &format!("{scheme}://{}", m.client),
                "--listen-peer-urls",
                &format!("http://{}", m.peer),
                "--initial-advertise-peer-urls",
                &format!("http://{}", m.peer),
                "--initial-cluster",
                &self.initial_cluster,
                "--initial-cluster-state",
                state,
                "--initial-cluster-token",
                "tessera-test",
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
            ])
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start etcd: {e}"))?;
        m.child = Some(child);
        Ok(())
    }

    /// Polls until every running member answers healthy (generous: a loaded machine is
    /// slow to elect, never wrong); fails at once, with the end of its log, when a member
    /// exits (as one does when its port was taken).
    pub async fn wait_healthy(&mut self) -> Result<(), String> {
        let end = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            for m in &mut self.members {
                if let Some(Ok(Some(status))) = m.child.as_mut().map(|c| c.try_wait()) {
                    let log =
                        std::fs::read_to_string(m.data.with_extension("log")).unwrap_or_default();
                    let tail: String = log.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
                    return Err(format!("etcd member {} exited ({status}): {tail}", m.name));
                }
            }
            let running: Vec<String> = self
                .members
                .iter()
                .filter(|m| m.child.is_some())
                .map(|m| m.client.clone())
                .collect();
            let out = etcdctl(self.tls.as_ref(), &running, &["endpoint", "health"]);
            if out.as_ref().is_ok_and(|(ok, _)| *ok) {
                return Ok(());
            }
            if tokio::time::Instant::now() > end {
                return Err(format!("etcd did not become healthy: {out:?}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `host:port` of every member's client port, running or not.
    pub fn client_addrs(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client.clone()).collect()
    }

    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(std::process::Child::id)
    }

    /// SIGKILL to member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a killed member again on its data dir.
    pub async fn restart(&mut self, i: usize) -> Result<(), String> {
        self.restart_all(&[i]).await
    }

    /// Starts killed members again together (a quorum must be back to be healthy).
    pub async fn restart_all(&mut self, members: &[usize]) -> Result<(), String> {
        for &i in members {
            self.spawn(i, "existing")?;
        }
        self.wait_healthy().await
    }

    /// The member that leads, polled until the running ones agree on one (generous
    /// deadline: an election on a loaded machine is slow, never wrong).
    pub async fn wait_leader(&self) -> usize {
        let end = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(l) = self.leader() {
                return l;
            }
            assert!(
                tokio::time::Instant::now() < end,
                "etcd elected no leader in 60 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The member that leads now, if the running ones agree on one.
    pub fn leader(&self) -> Option<usize> {
        let running: Vec<(usize, String)> = self
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.child.is_some())
            .map(|(i, m)| (i, m.client.clone()))
            .collect();
        for (i, addr) in &running {
            let Ok((true, out)) = etcdctl(
                self.tls.as_ref(),
                std::slice::from_ref(addr),
                &["endpoint", "status", "-w", "json"],
            ) else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_str(&out).ok()?;
            let s = &v[0]["Status"];
            if s["leader"].as_u64().is_some() && s["leader"] == s["header"]["member_id"] {
                return Some(*i);
            }
        }
        None
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

fn etcdctl(
    tls: Option<&EtcdTls>,
    endpoints: &[String],
    args: &[&str],
) -> Result<(bool, String), String> {
    let mut cmd = Command::new("etcdctl");
    if let Some(t) = tls {
        cmd.arg("--cacert")
            .arg(&t.ca)
            .arg("--cert")
            .arg(&t.cert)
            .arg("--key")
            .arg(&t.key);
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    let urls: Vec<String> = endpoints
        .iter()
        .map(|e| format!("{scheme}://{e}"))
        .collect();
    let out = cmd
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", urls.join(",")))
        .arg("--command-timeout=2s")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// A port nothing listens on now (bound, then released: the process that takes it next
/// is almost always the one meant to).
fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

/// A fresh database on the machine's PostgreSQL, dropped (with its connections) on drop.
/// Made with `psql`, so a test needs no database driver of its own. The server is
/// `TESSERA_TEST_POSTGRES` (an admin URL), default `postgres://root@127.0.0.1:5432/test`.
pub struct PgDatabase {
    /// The new database's URL.
    pub url: String,
    name: String,
}

fn pg_admin_url() -> String {
    std::env::var("TESSERA_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".to_owned())
}

fn psql(sql: &str) -> Result<(), String> {
    let out = Command::new("psql")
        .args([
            "-v",
            "ON_ERROR_STOP=1",
            "-q",
            "-d",
            &pg_admin_url(),
            "-c",
            sql,
        ])
        .output()
        .map_err(|e| format!("psql: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

impl PgDatabase {
    pub fn create() -> Result<PgDatabase, String> {
        use std::hash::{BuildHasher, RandomState};
        let name = format!(
            "tessera_test_{:016x}",
            RandomState::new().hash_one(std::time::SystemTime::now())
        );
        psql(&format!("CREATE DATABASE {name}"))?;
        let admin = pg_admin_url();
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        Ok(PgDatabase {
            url: format!("{base}/{name}"),
            name,
        })
    }

    /// [`PgDatabase::create`], or `None` with a printed reason outside CI.
    pub fn create_or_skip() -> Option<PgDatabase> {
        match PgDatabase::create() {
            Ok(db) => Some(db),
            Err(e) => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "PostgreSQL at {} is required in CI: {e}",
                    pg_admin_url()
                );
                eprintln!(
                    "skipping: no PostgreSQL at {} ({e}); set TESSERA_TEST_POSTGRES",
                    pg_admin_url()
                );
                None
            }
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let _ = psql(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ));
    }
}
