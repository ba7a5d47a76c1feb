//! Fault: herald is killed with SIGKILL mid-stream and restarted. Subscribers that resume
//! with their Last-Event-ID get an explicit gap signal for what the dead process took with
//! it, then everything the new process accepted: never a silent loss, never a duplicate.
mod common;

use common::*;
use std::net::SocketAddr;

const SUBS: usize = 20;

fn publish_seq(ingest_addr: SocketAddr, from: usize, to: usize) {
    // One connection per event: the reply stream ending cleanly is the acknowledgement.
    for k in from..to {
        assert!(ingest(ingest_addr, &[event_line("f", &k.to_string())]).is_empty());
    }
}

#[test]
fn kill_9_and_restart_resume_with_a_gap_signal_and_no_duplicate() {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let ingest_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let Some((mut first, addr)) = spawn_at(listen, ingest_addr, &[]) else {
        return;
    };
    let mut subs: Vec<Client> = (0..SUBS)
        .map(|_| Client::subscribe(addr, "/events/f"))
        .collect();
    wait_streams(addr, SUBS as u64);
    publish_seq(ingest_addr, 0, 50);
    for c in subs.iter_mut() {
        c.wait_events(50);
    }
    // More events, then the crash while they may still be in flight.
    publish_seq(ingest_addr, 50, 60);
    signal(&first, "-KILL");
    first.wait().unwrap();
    let mut last_seen = Vec::new();
    for c in subs.iter_mut() {
        let evs = c.read_to_end().to_vec();
        assert!(
            !c.parser.ended,
            "a killed server cannot end the stream cleanly"
        );
        let seqs: Vec<usize> = evs.iter().map(|e| e.data.parse().unwrap()).collect();
        assert_eq!(
            seqs,
            (0..seqs.len()).collect::<Vec<_>>(),
            "in order, no duplicate before the crash"
        );
        assert!(seqs.len() >= 50);
        last_seen.push(evs.last().unwrap().id.clone().unwrap());
    }

    let Some((mut second, addr)) = spawn_at(listen, ingest_addr, &[]) else {
        return;
    };
    publish_seq(ingest_addr, 100, 110);
    let mut resumed: Vec<Client> = last_seen
        .iter()
        .map(|id| {
            let c = Client::get(addr, "/events/f", &format!("Last-Event-ID: {id}\r\n"));
            assert_eq!(c.status, 200);
            c
        })
        .collect();
    for (c, id) in resumed.iter_mut().zip(&last_seen) {
        let evs = c.wait_events(11).to_vec();
        assert_eq!(
            evs[0].event, "herald-gap",
            "the restart is signalled, not silent"
        );
        let gap: serde_json::Value = serde_json::from_str(&evs[0].data).unwrap();
        assert_eq!(gap["requested"], id.as_str());
        let seqs: Vec<usize> = evs[1..].iter().map(|e| e.data.parse().unwrap()).collect();
        assert_eq!(
            seqs,
            (100..110).collect::<Vec<_>>(),
            "everything the new process accepted"
        );
        // New ids are greater than any id of the previous run.
        let new_id: u64 = evs[1].id.as_ref().unwrap().parse().unwrap();
        assert!(new_id > id.parse::<u64>().unwrap());
    }
    wait_streams(addr, SUBS as u64);
    publish_seq(ingest_addr, 110, 111);
    for c in resumed.iter_mut() {
        let evs = c.wait_events(12);
        assert_eq!(evs[11].data, "110", "then live, exactly once");
    }
    signal(&second, "-TERM");
    assert!(second.wait().unwrap().success());
    for c in resumed.iter_mut() {
        let n = c.read_to_end().len();
        assert_eq!(n, 12, "nothing extra before the clean end");
        assert!(c.parser.ended);
    }
}
