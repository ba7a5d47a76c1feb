//! A published event's fields and their publish-time validation.
//! Invariant: a `Publish` that passed `validate` has a well-formed topic and
//! `event`/`id` values free of CR, LF and NUL, so no field can be injected on
//! the wire; `data` is unrestricted and made safe by `sse::encode`.

/// Longest topic name, in bytes.
pub const MAX_TOPIC_LEN: usize = 200;
/// Longest event id, in bytes.
pub const MAX_ID_LEN: usize = 128;
/// Longest event type, in bytes.
pub const MAX_EVENT_TYPE_LEN: usize = 128;

/// One event as a publisher submitted it (before id assignment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub topic: String,
    pub data: String,
    pub event: Option<String>,
    pub id: Option<String>,
    /// Reconnection delay hint for clients, in milliseconds.
    pub retry: Option<u32>,
}

/// Why a published event was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PublishError {
    #[error("invalid topic: must be 1 to {max} bytes of [A-Za-z0-9._~:/@-]")]
    InvalidTopic { max: usize },
    #[error("event type must not be empty")]
    EmptyEventType,
    #[error("{field} must not contain CR, LF or NUL")]
    ControlChar { field: &'static str },
    #[error("id longer than {max} bytes")]
    IdTooLong { max: usize },
    #[error("event type longer than {max} bytes")]
    EventTypeTooLong { max: usize },
    #[error("too many topics: herald keeps at most {max} (--history-topics)")]
    TooManyTopics { max: usize },
}

/// Whether `b` may appear in a topic name.
fn is_topic_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b':' | b'/' | b'@' | b'-')
}

/// Checks a (URL-decoded) topic name: 1..=200 bytes of `[A-Za-z0-9._~:/@-]`.
pub fn validate_topic(topic: &str) -> Result<(), PublishError> {
    let ok = !topic.is_empty() && topic.len() <= MAX_TOPIC_LEN && topic.bytes().all(is_topic_byte);
    if ok {
        Ok(())
    } else {
        Err(PublishError::InvalidTopic { max: MAX_TOPIC_LEN })
    }
}

fn has_control(s: &str) -> bool {
    s.bytes().any(|b| matches!(b, b'\r' | b'\n' | b'\0'))
}

impl Publish {
    /// Checks every field against the contract; `data` may hold anything.
    pub fn validate(&self) -> Result<(), PublishError> {
        validate_topic(&self.topic)?;
        if let Some(event) = &self.event {
            if event.is_empty() {
                return Err(PublishError::EmptyEventType);
            }
            if has_control(event) {
                return Err(PublishError::ControlChar { field: "event" });
            }
            if event.len() > MAX_EVENT_TYPE_LEN {
                return Err(PublishError::EventTypeTooLong {
                    max: MAX_EVENT_TYPE_LEN,
                });
            }
        }
        if let Some(id) = &self.id {
            if has_control(id) {
                return Err(PublishError::ControlChar { field: "id" });
            }
            if id.len() > MAX_ID_LEN {
                return Err(PublishError::IdTooLong { max: MAX_ID_LEN });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(topic: &str, event: Option<&str>, id: Option<&str>) -> Publish {
        Publish {
            topic: topic.to_owned(),
            data: "line one\r\nline two\nthree\r".to_owned(),
            event: event.map(str::to_owned),
            id: id.map(str::to_owned),
            retry: None,
        }
    }

    #[test]
    fn topics() {
        let long = "a".repeat(MAX_TOPIC_LEN);
        let too_long = "a".repeat(MAX_TOPIC_LEN + 1);
        let cases: &[(&str, bool)] = &[
            ("scores", true),
            ("a/b/c", true),
            ("A-z_0.9~:@", true),
            (&long, true),
            ("", false),
            (&too_long, false),
            ("a b", false),
            ("a?b", false),
            ("a%2F", false),
            ("é", false),
            ("a\nb", false),
        ];
        for (topic, ok) in cases {
            assert_eq!(validate_topic(topic).is_ok(), *ok, "topic {topic:?}");
        }
    }

    #[test]
    fn fields() {
        let long_id = "i".repeat(MAX_ID_LEN);
        let too_long_id = "i".repeat(MAX_ID_LEN + 1);
        let too_long_ev = "e".repeat(MAX_EVENT_TYPE_LEN + 1);
        /// (event, id, expected verdict)
        type Case<'a> = (Option<&'a str>, Option<&'a str>, Result<(), PublishError>);
        let cases: &[Case] = &[
            (None, None, Ok(())),
            (Some("goal"), Some("42"), Ok(())),
            (None, Some(""), Ok(())),
            (None, Some(&long_id), Ok(())),
            (Some(""), None, Err(PublishError::EmptyEventType)),
            (
                Some("a\nb"),
                None,
                Err(PublishError::ControlChar { field: "event" }),
            ),
            (
                Some("a\rb"),
                None,
                Err(PublishError::ControlChar { field: "event" }),
            ),
            (
                Some("a\0b"),
                None,
                Err(PublishError::ControlChar { field: "event" }),
            ),
            (
                None,
                Some("1\n2"),
                Err(PublishError::ControlChar { field: "id" }),
            ),
            (
                None,
                Some("1\r"),
                Err(PublishError::ControlChar { field: "id" }),
            ),
            (
                None,
                Some("\0"),
                Err(PublishError::ControlChar { field: "id" }),
            ),
            (
                None,
                Some(&too_long_id),
                Err(PublishError::IdTooLong { max: MAX_ID_LEN }),
            ),
            (
                Some(&too_long_ev),
                None,
                Err(PublishError::EventTypeTooLong {
                    max: MAX_EVENT_TYPE_LEN,
                }),
            ),
        ];
        for (event, id, want) in cases {
            assert_eq!(
                &publish("t", *event, *id).validate(),
                want,
                "{event:?} {id:?}"
            );
        }
        assert_eq!(
            publish("bad topic", None, None).validate(),
            Err(PublishError::InvalidTopic { max: MAX_TOPIC_LEN })
        );
    }

    #[test]
    fn messages_are_human() {
        let msg = PublishError::ControlChar { field: "id" }.to_string();
        assert_eq!(msg, "id must not contain CR, LF or NUL");
        assert!(PublishError::IdTooLong { max: 128 }
            .to_string()
            .contains("128"));
    }
}
