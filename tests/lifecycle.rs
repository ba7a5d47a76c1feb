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
