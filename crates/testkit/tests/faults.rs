//! The faults work as documented, on this machine, as root.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

/// A process in the namespace reaches a server on the host until the link is cut, and
/// again once it is healed.
#[tokio::test]
async fn a_cut_namespace_cannot_reach_the_host_until_healed() {
    let Some(ns) = tessera_testkit::Netns::create_or_skip() else {
        return;
    };
    let server = TcpListener::bind((ns.host_ip(), 0)).unwrap();
    let port = server.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in server.incoming().flatten() {
            let mut b = [0u8; 5];
            if c.read_exact(&mut b).is_ok() {
                let _ = c.write_all(b"pong\n");
            }
        }
    });
    // bash's /dev/tcp: no client program needed in the namespace.
    let ping = |secs: u32| {
        let script = format!(
            "exec 3<>/dev/tcp/{}/{port} && echo ping >&3 && head -c5 <&3",
            ns.host_ip()
        );
        let out = ns
            .command("timeout")
            .args([secs.to_string(), "bash".into(), "-c".into(), script])
            .output()
            .unwrap();
        out.status.success() && out.stdout == b"pong\n"
    };
    tessera_testkit::wait_until(
        "the namespace to reach the host",
        Duration::from_secs(60),
        || async { ping(10) },
    )
    .await;
    ns.cut();
    // A failure is what is waited for: a slow machine cannot make it pass wrongly.
    assert!(!ping(2), "reached the host through a cut link");
    ns.heal();
    tessera_testkit::wait_until(
        "the healed link to carry traffic",
        Duration::from_secs(60),
        || async { ping(10) },
    )
    .await;
}
