//! Resume with Last-Event-ID: replay after the id, then live, with no gap and no
//! duplicate at the hand-over; an unknown id gets an explicit `herald-gap` signal.
mod common;

use common::*;
use std::time::Duration;

fn publish_n(s: &TestServer, topic: &str, from: usize, to: usize) -> Vec<String> {
    (from..to)
        .map(|i| {
            let r = http_publish(s.addr, topic, &i.to_string());
            assert_eq!(r.status, 200);
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            v["id"].as_str().unwrap().to_string()
        })
        .collect()
}

#[test]
fn last_event_id_header_and_query_replay_exactly_what_came_after() {
    let Some(s) = start(|_| {}) else { return };
    let ids = publish_n(&s, "r", 0, 10);
    let mut c = Client::get(
        s.addr,
        "/events/r",
        &format!("Last-Event-ID: {}\r\n", ids[6]),
    );
    assert_eq!(c.status, 200);
    let got: Vec<String> = c.wait_events(3).iter().map(|e| e.data.clone()).collect();
    assert_eq!(got, ["7", "8", "9"]);
    // Then live.
    publish_n(&s, "r", 10, 11);
    assert_eq!(c.wait_events(4)[3].data, "10");
    let mut q = Client::subscribe(s.addr, &format!("/events/r?lastEventId={}", ids[8]));
    assert_eq!(
        q.wait_events(2)
            .iter()
            .map(|e| e.data.as_str())
            .collect::<Vec<_>>(),
        ["9", "10"]
    );
    let mut q2 = Client::subscribe(s.addr, &format!("/events/r?last_event_id={}", ids[9]));
    assert_eq!(q2.wait_events(1)[0].data, "10");
    // Header wins over the query.
    let mut both = Client::get(
        s.addr,
        &format!("/events/r?lastEventId={}", ids[0]),
        &format!("Last-Event-ID: {}\r\n", ids[9]),
    );
    assert_eq!(both.wait_events(1)[0].data, "10");
    std::thread::sleep(Duration::from_millis(100));
    assert!(metric(s.addr, "herald_replays_total") >= 4);
    s.stop();
}

#[test]
fn unknown_or_expired_ids_get_a_gap_event_before_the_retained_ones() {
    let Some(s) = start(|c| c.history_events = 5) else {
        return;
    };
    let ids = publish_n(&s, "g", 0, 8);
    let mut c = Client::get(
        s.addr,
        "/events/g",
        &format!("Last-Event-ID: {}\r\n", ids[0]),
    );
    let evs = c.wait_events(6).to_vec();
    assert_eq!(evs[0].event, "herald-gap");
    let gap: serde_json::Value = serde_json::from_str(&evs[0].data).unwrap();
    assert_eq!(gap["requested"], ids[0].as_str());
    assert_eq!(gap["oldest"], ids[3].as_str());
    assert_eq!(
        evs[1..].iter().map(|e| e.data.as_str()).collect::<Vec<_>>(),
        ["3", "4", "5", "6", "7"]
    );
    let mut u = Client::get(s.addr, "/events/g", "Last-Event-ID: never-seen\r\n");
    assert_eq!(u.wait_events(1)[0].event, "herald-gap");
    assert!(metric(s.addr, "herald_gap_signals_total") >= 2);
    s.stop();
}

#[test]
fn resuming_while_events_are_published_has_no_gap_and_no_duplicate() {
    const CLIENTS: usize = 2000;
    const BEFORE: usize = 100;
    const TOTAL: usize = 600;
    let Some(s) = start(|c| c.history_events = 10_000) else {
        return;
    };
    let ids = publish_n(&s, "race", 0, BEFORE);
    let resume_from = 49;
    let ingest_addr = s.ingest;
    let publisher = std::thread::spawn(move || {
        for chunk in (BEFORE..TOTAL).collect::<Vec<_>>().chunks(5) {
            let lines: Vec<String> = chunk
                .iter()
                .map(|i| event_line("race", &i.to_string()))
                .collect();
            assert!(ingest(ingest_addr, &lines).is_empty());
        }
    });
    let path = format!("/events/race?lastEventId={}", ids[resume_from]);
    let mut crowd = Crowd::connect(s.addr, &path, CLIENTS);
    publisher.join().unwrap();
    let want = TOTAL - resume_from - 1;
    assert!(
        crowd.pump_until(Duration::from_secs(60), |cs| cs
            .iter()
            .all(|c| c.events.len() >= want)),
        "some resumed clients missed events"
    );
    crowd.pump_until(Duration::from_millis(200), |_| false);
    for (i, c) in crowd.conns.iter().enumerate() {
        let got: Vec<usize> = c.events.iter().map(|e| e.data.parse().unwrap()).collect();
        let expect: Vec<usize> = (resume_from + 1..TOTAL).collect();
        assert_eq!(got, expect, "client {i}");
    }
    s.stop();
}

#[test]
fn a_closed_topic_ends_its_streams_and_answers_204() {
    let Some(s) = start(|_| {}) else { return };
    let mut c = Client::subscribe(s.addr, "/events/done");
    wait_streams(s.addr, 1);
    ingest(
        s.ingest,
        &[
            event_line("done", "last"),
            r#"{"topic":"done","control":"close"}"#.to_string(),
        ],
    );
    let evs = c.read_to_end().to_vec();
    assert_eq!(evs.len(), 1);
    assert!(c.parser.ended, "stream ended with the last chunk");
    let again = Client::get(s.addr, "/events/done", "");
    assert_eq!(again.status, 204);
    s.stop();
}

#[test]
fn first_subscribers_of_their_topics_resume_while_those_topics_are_published_to() {
    // Per-user shape: every client is the first (and only) subscriber of its topic on
    // its worker, so each resume registers the worker for the topic while events for it
    // are being published.
    const TOPICS: usize = 300;
    const BEFORE: usize = 10;
    const TOTAL: usize = 50;
    let Some(s) = start(|c| c.history_events = 1000) else {
        return;
    };
    let line = |k: usize, i: usize| {
        serde_json::json!({"topic": format!("u{k}"), "id": format!("u{k}-{i}"), "data": i.to_string()})
            .to_string()
    };
    let before: Vec<String> = (0..BEFORE)
        .flat_map(|i| (0..TOPICS).map(move |k| (k, i)))
        .map(|(k, i)| line(k, i))
        .collect();
    assert!(ingest(s.ingest, &before).is_empty());
    let ingest_addr = s.ingest;
    let publisher = std::thread::spawn(move || {
        for i in BEFORE..TOTAL {
            let lines: Vec<String> = (0..TOPICS).map(|k| line(k, i)).collect();
            assert!(ingest(ingest_addr, &lines).is_empty());
        }
    });
    let resume_from = BEFORE / 2;
    let mut crowds: Vec<Crowd> = (0..TOPICS)
        .map(|k| {
            let path = format!("/events/u{k}?lastEventId=u{k}-{resume_from}");
            Crowd::connect(s.addr, &path, 1)
        })
        .collect();
    publisher.join().unwrap();
    let expect: Vec<usize> = (resume_from + 1..TOTAL).collect();
    for (k, crowd) in crowds.iter_mut().enumerate() {
        assert!(
            crowd.pump_until(WAIT, |cs| cs[0].events.len() >= expect.len()),
            "client {k} missed events"
        );
        crowd.pump_until(Duration::from_millis(5), |_| false);
        let c = &crowd.conns[0];
        let got: Vec<usize> = c.events.iter().map(|e| e.data.parse().unwrap()).collect();
        assert_eq!(got, expect, "client {k}: no gap, no duplicate");
    }
    s.stop();
}
