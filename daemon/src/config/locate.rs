//! Maps a field path inside a YAML document (`spec.ports[0].number`) to the line and column where
//! that node starts, using yaml-rust2's marked parser events. serde_yaml's values carry no
//! positions, so validation errors are located after the fact through this index.
//!
//! Invariant: documents are numbered as the YAML stream numbers them (the first is 0), the same
//! order serde_yaml's multi-document deserializer yields them in.

use std::collections::HashMap;

use yaml_rust2::{
    parser::{Event, MarkedEventReceiver, Parser},
    scanner::Marker,
};

/// Positions of every mapping key and sequence item of every document in one file, keyed by a
/// 64-bit hash of (document, path) rather than the path itself: an index entry costs 16 bytes
/// instead of a heap string, which is most of what a large configuration's index weighs (a
/// collision, about one in 10¹³ for a million paths, would only misplace an error's position).
#[derive(Debug, Default)]
pub struct Locator {
    positions: HashMap<u64, (u32, u32)>,
}

/// The index key of `path` in document `doc`.
fn key(doc: usize, path: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    doc.hash(&mut h);
    path.hash(&mut h);
    h.finish()
}

enum Frame {
    /// `pending`: the mapping's own position is recorded at its first key (the scanner's mark
    /// for a block mapping's start is not where the user sees it begin).
    Map {
        path: String,
        key: Option<String>,
        pending: bool,
    },
    Seq {
        path: String,
        index: usize,
    },
}

struct Builder {
    doc: Option<usize>,
    stack: Vec<Frame>,
    positions: HashMap<u64, (u32, u32)>,
}

// === impl Locator ===

impl Locator {
    /// Indexes `text`; a text that fails to parse yields a partial index (serde_yaml reports the
    /// syntax error itself, with its own position).
    pub fn new(text: &str) -> Self {
        let mut builder = Builder {
            doc: None,
            stack: Vec::new(),
            positions: HashMap::new(),
        };
        let _ = Parser::new_from_str(text).load(&mut builder, true);
        Self {
            positions: builder.positions,
        }
    }

    /// Line and column (1-based) of exactly `path` in document `doc`, if the document has it.
    pub fn exact(&self, doc: usize, path: &str) -> Option<(usize, usize)> {
        let (line, col) = *self.positions.get(&key(doc, path))?;
        Some((line as usize, col as usize))
    }

    /// Line and column (1-based) of `path` in document `doc`, or of its nearest located ancestor.
    pub fn locate(&self, doc: usize, path: &str) -> Option<(usize, usize)> {
        let mut path = path.to_string();
        loop {
            if let Some(&(line, col)) = self.positions.get(&key(doc, &path)) {
                return Some((line as usize, col as usize));
            }
            if path.is_empty() {
                return None;
            }
            let cut = path.rfind(['.', '[']).unwrap_or(0);
            path.truncate(cut);
        }
    }
}

// === impl Builder ===

impl Builder {
    fn record(&mut self, path: String, mark: Marker) {
        if let Some(doc) = self.doc {
            // Columns from the scanner are 0-based; report 1-based like editors do.
            let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
            self.positions
                .entry(key(doc, &path))
                .or_insert((clamp(mark.line()), clamp(mark.col() + 1)));
        }
    }

    /// Path of the node that starts now, recording its position; `None` when it is a mapping key.
    fn node_path(&mut self, scalar: Option<&str>, mark: Marker) -> Option<String> {
        let (path, record) = match self.stack.last_mut() {
            None => (String::new(), true),
            Some(Frame::Map {
                path,
                key: key @ None,
                pending,
            }) => {
                let k = scalar.unwrap_or("?").to_string();
                let full = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                *key = Some(k);
                let own = std::mem::take(pending).then(|| path.clone());
                if let Some(own) = own {
                    self.record(own, mark);
                }
                self.record(full, mark);
                return None;
            }
            Some(Frame::Map {
                path, key: Some(k), ..
            }) => (
                if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                },
                false,
            ),
            Some(Frame::Seq { path, index }) => (format!("{path}[{index}]"), true),
        };
        if record {
            self.record(path.clone(), mark);
        }
        Some(path)
    }

    /// Path of the sequence item that starts now (position recorded later, at its first key).
    fn item_path(&self) -> String {
        match self.stack.last() {
            Some(Frame::Seq { path, index }) => format!("{path}[{index}]"),
            _ => String::new(),
        }
    }

    /// A value node finished: advance the parent frame.
    fn value_done(&mut self) {
        match self.stack.last_mut() {
            Some(Frame::Map { key, .. }) => *key = None,
            Some(Frame::Seq { index, .. }) => *index += 1,
            None => {}
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::DocumentStart => {
                self.doc = Some(self.doc.map_or(0, |d| d + 1));
                self.stack.clear();
            }
            Event::Scalar(value, ..) if self.node_path(Some(&value), mark).is_some() => {
                self.value_done()
            }
            Event::Alias(_) if self.node_path(None, mark).is_some() => self.value_done(),
            Event::MappingStart(..) => {
                // Sequence items and the document's root mapping are located at their first key
                // (the scanner's start marks for them are not where the user sees them begin).
                let pending =
                    self.stack.is_empty() || matches!(self.stack.last(), Some(Frame::Seq { .. }));
                let path = if pending {
                    self.item_path()
                } else {
                    self.node_path(None, mark).unwrap_or_default()
                };
                self.stack.push(Frame::Map {
                    path,
                    key: None,
                    pending,
                });
            }
            Event::SequenceStart(..) => {
                let path = self.node_path(None, mark).unwrap_or_default();
                self.stack.push(Frame::Seq { path, index: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                self.value_done();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
apiVersion: v1
kind: A
spec:
  ports:
  - number: 80
    name: http
  - number: 90000
---
kind: B
spec:
  hosts: [a, b]
";

    #[test]
    fn locates_keys_and_items_across_documents() {
        let l = Locator::new(TEXT);
        assert_eq!(l.locate(0, "kind"), Some((2, 1)));
        assert_eq!(l.locate(0, "spec.ports[0].name"), Some((6, 5)));
        assert_eq!(l.locate(0, "spec.ports[1].number"), Some((7, 5)));
        assert_eq!(l.locate(1, "spec.hosts[1]"), Some((11, 14)));
    }

    #[test]
    fn falls_back_to_nearest_ancestor() {
        let l = Locator::new(TEXT);
        assert_eq!(l.locate(0, "spec.ports[1].targetPort"), Some((7, 5)));
        assert_eq!(l.locate(1, "spec.missing"), Some((10, 1)));
    }
}
