//! The recorder on a real child process: the pages the child writes appear in the
//! trace, with the right contents, in the epoch that wrote them.

use std::io::{BufRead, BufReader, Cursor, Write};
use std::process::{Command, Stdio};

use fgbi_hyp::trace::{Recorder, Trace, TraceWriter};

const PAGE: usize = 4096;

/// mawk (Debian's required awk) builds a 128 KiB string of a 16-byte pattern, says
/// "ready", waits for a line, builds a second one, says "ready", waits again.
const SCRIPT: &str = r#"BEGIN {
    s = "fgbi-trace-one!\n"; while (length(s) < 131072) s = s s
    print "ready"; fflush(); getline l
    t = "fgbi-trace-two!\n"; while (length(t) < 131072) t = t t
    print "ready"; fflush(); getline l
}"#;

/// True if `page` lies wholly inside a string of `p` repeated (from any phase).
fn is_pattern(page: &[u8], p: &[u8; 16]) -> bool {
    let twice = p.repeat(2);
    page.chunks(16).all(|c| c == &page[..16]) && twice.windows(16).any(|w| w == &page[..16])
}

#[test]
fn the_pages_a_child_writes_appear_in_the_trace() {
    // Interactive: mawk reads its input line by line instead of in blocks.
    let mut child = Command::new("mawk")
        .args(["-W", "interactive", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("mawk (Debian's awk) must be installed to run the recorder test");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let mut recorder = Recorder::new(child.id() as i32).unwrap();
    let mut writer = TraceWriter::new(Cursor::new(Vec::new()), 1).unwrap();
    for _ in 0..2 {
        line.clear();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line, "ready\n");
        let capture = recorder.capture().unwrap();
        assert!(!capture.stopped.is_zero());
        writer.write_epoch(&capture.epoch).unwrap();
        // The child must have been resumed: it answers the next line.
        stdin.write_all(b"go\n").unwrap();
        stdin.flush().unwrap();
    }
    line.clear();
    assert_eq!(stdout.read_line(&mut line).unwrap(), 0, "child exits");
    assert!(child.wait().unwrap().success());
    let bytes = writer.finish(recorder.pages()).unwrap().into_inner();
    let trace = Trace::read(&bytes[..]).unwrap();
    assert_eq!(trace.epochs().len(), 2);
    let (one, two) = (b"fgbi-trace-one!\n", b"fgbi-trace-two!\n");
    let count = |epoch: usize, p: &[u8; 16]| {
        trace.epochs()[epoch]
            .iter()
            .filter(|(_, bytes)| is_pattern(bytes, p))
            .count()
    };
    // 128 KiB of pattern covers at least 31 whole pages wherever it starts.
    assert!(count(0, one) >= 31, "first string in epoch 0");
    assert_eq!(count(0, two), 0, "second string not yet written");
    assert!(count(1, two) >= 31, "second string in epoch 1");
    // Replaying both epochs gives memory holding the second string.
    let mut memory = vec![0u8; trace.mem_bytes() as usize];
    for epoch in trace.epochs() {
        for (page, bytes) in epoch.iter() {
            memory[page as usize * PAGE..][..PAGE].copy_from_slice(bytes);
        }
    }
    assert!(memory.chunks(PAGE).filter(|p| is_pattern(p, two)).count() >= 31);
}

#[test]
fn a_missing_process_is_reported_as_gone() {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id() as i32;
    child.wait().unwrap();
    let err = Recorder::new(pid).unwrap().capture().unwrap_err();
    assert!(err.to_string().contains("gone"), "{err}");
    assert!(Recorder::new(0).is_err());
    assert!(Recorder::new(-1).is_err());
}
