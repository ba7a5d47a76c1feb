//! The real binary: `herald serve` on given ports, SIGTERM drains and exits 0 with
//! everything acknowledged delivered.
mod common;

use common::*;
use std::process::Command;

#[test]
fn sigterm_flushes_every_acknowledged_event_and_exits_zero() {
    let Some((mut child, addr)) = spawn(&["--drain-window", "300ms"]) else {
        return;
    };
    let mut c = Client::subscribe(addr, "/events/bye");
    wait_streams(addr, 1);
    for i in 0..200 {
        assert_eq!(http_publish(addr, "bye", &i.to_string()).status, 200);
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let evs = c.read_to_end().to_vec();
    let got: Vec<String> = evs.iter().map(|e| e.data.clone()).collect();
    let want: Vec<String> = (0..200).map(|i| i.to_string()).collect();
    assert_eq!(got, want);
    assert!(c.parser.ended, "stream ended cleanly with the last chunk");
    assert!(c.parser.retry.is_some(), "a retry hint before closing");
    let code = child.wait().unwrap();
    assert!(code.success(), "exit status {code:?}");
}

/// Lines a publisher sent just before SIGTERM, to topics whose subscribers are spread
/// over both workers, all reach them, and every stream then ends cleanly (ingest runs
/// inside the first worker; shutdown stops it before the workers drain).
#[test]
fn sigterm_publishes_the_ingest_lines_already_sent_before_the_streams_end() {
    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let ingest_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let Some((mut child, addr)) = spawn_at(listen, ingest_addr, &["--drain-window", "300ms"])
    else {
        return;
    };
    let mut subs: Vec<Client> = (0..4)
        .map(|k| Client::subscribe(addr, &format!("/events/late-{k}")))
        .collect();
    wait_streams(addr, 4);
    // Sent, not waited for: on loopback the bytes are in herald's socket when the write
    // returns, but nothing says herald has read them.
    let mut publisher = std::net::TcpStream::connect(ingest_addr).unwrap();
    let mut all = String::new();
    for i in 0..400 {
        all.push_str(&event_line(&format!("late-{}", i % 4), &i.to_string()));
        all.push('\n');
    }
    std::io::Write::write_all(&mut publisher, all.as_bytes()).unwrap();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    for (k, c) in subs.iter_mut().enumerate() {
        let got: Vec<String> = c.read_to_end().iter().map(|e| e.data.clone()).collect();
        let want: Vec<String> = (0..400)
            .filter(|i| i % 4 == k)
            .map(|i| i.to_string())
            .collect();
        assert_eq!(got, want, "stream late-{k}");
        assert!(c.parser.ended, "stream late-{k} ended with the last chunk");
    }
    let code = child.wait().unwrap();
    assert!(code.success(), "exit status {code:?}");
}

#[test]
fn serve_reads_its_settings_from_a_toml_file_and_flags_win() {
    let dir = std::env::temp_dir().join(format!("herald-toml-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("herald.toml");
    std::fs::write(&file, "keepalive = \"100ms\"\ndemo = false\n").unwrap();
    let Some((mut child, addr)) = spawn(&["--config", file.to_str().unwrap(), "--demo", "true"])
    else {
        return;
    };
    let mut c = Client::subscribe(addr, "/events/k");
    let before = c.parser.comments;
    c.wait_until(|p, _| p.comments >= before + 2);
    assert_eq!(
        http_get(addr, "/").status,
        200,
        "--demo true wins over the file"
    );
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_graceful_restart_with_a_history_file_resumes_clients_without_a_gap() {
    let dir = std::env::temp_dir().join(format!("herald-hist-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("history.ndjson");
    let _ = std::fs::remove_file(&file);
    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let ingest_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let args = ["--history-file", file.to_str().unwrap()];
    let Some((mut first, addr)) = spawn_at(listen, ingest_addr, &args) else {
        return;
    };
    let ids: Vec<String> = (0..10)
        .map(|i| {
            let r = http_publish(addr, "h", &i.to_string());
            serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    signal(&first, "-TERM");
    assert!(first.wait().unwrap().success());
    assert!(file.exists(), "history saved on shutdown");

    let Some((mut second, addr)) = spawn_at(listen, ingest_addr, &args) else {
        return;
    };
    for i in 10..13 {
        assert_eq!(http_publish(addr, "h", &i.to_string()).status, 200);
    }
    // A client that had seen event 6 before the restart.
    let mut c = Client::get(addr, "/events/h", &format!("Last-Event-ID: {}\r\n", ids[6]));
    let got: Vec<String> = c
        .wait_events(6)
        .iter()
        .map(|e| format!("{}:{}", e.event, e.data))
        .collect();
    let want: Vec<String> = (7..13).map(|i| format!("message:{i}")).collect();
    assert_eq!(got, want, "no gap signal, nothing missing, nothing twice");
    signal(&second, "-TERM");
    assert!(second.wait().unwrap().success());
}
