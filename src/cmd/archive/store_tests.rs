use super::*;
use crate::core::archive::{FileMatch, Index, Query};

fn t(s: &str) -> Stamp {
    Stamp::parse(s).unwrap()
}

fn line(i: u32, time: &str) -> Vec<u8> {
    let l = ArchiveLine {
        time: t(time),
        code: 201,
        source: "radar".into(),
        client: "cfs".into(),
        host: "node1".into(),
        flow: "f1".into(),
        from_cluster: "ddsr".into(),
        rel_path: format!("20240101/radar/f{i}.h5"),
        base_url: "sftp://x".into(),
        message: "Downloaded".into(),
        topic: "v02.report.x".into(),
        pub_time: None,
        identity: None,
        duration_s: None,
        size: None,
        hops: None,
        to_clusters: vec![],
        other: vec![],
    };
    l.to_line().into_bytes()
}

fn lines(range: std::ops::Range<u32>, time: &str) -> Vec<u8> {
    range.flat_map(|i| line(i, time)).collect()
}

fn read_all(path: &Path, compressed: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for_each_chunk(path, compressed, &mut |c| {
        out.extend_from_slice(c);
        true
    })
    .unwrap();
    out
}

#[test]
fn hour_names() {
    let s = t("20240229T235959.5");
    let h = hour_path(s);
    assert_eq!(h, "2024/02/29/23");
    assert_eq!(hour_start(&h), Some(t("20240229T230000")));
    for bad in [
        "2024/02/30/23",
        "2024/02/29/24",
        "2024-02-29-23",
        "2024/02/29/2",
        "",
    ] {
        assert_eq!(hour_start(bad), None, "{bad}");
    }
}

#[test]
fn write_close_compress_and_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ddsr");
    let mut w = Writer::new(&dir);
    assert!(w.prepare(t("20240101T100000")).unwrap().is_empty());
    let a = lines(0..100, "20240101T100000");
    let b = lines(100..150, "20240101T110000");
    w.append("2024/01/01/10", &a, true).unwrap();
    assert!(w.take_closed().is_empty());
    w.append("2024/01/01/11", &b, false).unwrap();
    assert_eq!(w.take_closed(), ["2024/01/01/10"]);
    let stop = AtomicBool::new(false);
    let n = compress_hour(&dir, "2024/01/01/10", 3, &stop).unwrap();
    assert_eq!((n.lines, n.malformed, n.cut), (100, 0, 0));
    assert_eq!(n.raw_bytes, a.len() as u64);
    let base = hour_base(&dir, "2024/01/01/10");
    assert!(!with_ext(&base, LOG).exists());
    assert_eq!(read_all(&with_ext(&base, ZST), true), a);
    let idx = Index::decode(&fs::read(with_ext(&base, IDX)).unwrap()).unwrap();
    assert_eq!(idx.lines(), 100);
    let q = |name: &str| Query {
        file: Some(FileMatch::Name(name.into())),
        ..Default::default()
    };
    assert!(idx.may_contain(&q("f7.h5")));
    assert!(!idx.may_contain(&q("f120.h5")));
    let hours = list_hours(&dir).unwrap();
    assert_eq!(
        hours,
        [
            Hour {
                hour: "2024/01/01/10".into(),
                log: false,
                zst: true,
                idx: true
            },
            Hour {
                hour: "2024/01/01/11".into(),
                log: true,
                zst: false,
                idx: false
            }
        ]
    );
    assert_eq!(
        read_all(&with_ext(&hour_base(&dir, "2024/01/01/11"), LOG), false),
        b
    );
}

#[test]
fn chunks_are_whole_lines_and_the_partial_tail_comes_last() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("x.log");
    let mut text = lines(0..40_000, "20240101T100000");
    let whole = text.len();
    text.extend_from_slice(b"20240101T1000 partial");
    fs::write(&p, &text).unwrap();
    let mut pieces = 0;
    let mut got = Vec::new();
    for_each_chunk(&p, false, &mut |c| {
        pieces += 1;
        got.extend_from_slice(c);
        true
    })
    .unwrap();
    assert_eq!(got, text);
    assert!(pieces >= 2, "{whole} bytes in {pieces} pieces");
    // Stopping early.
    let mut calls = 0;
    for_each_chunk(&p, false, &mut |_| {
        calls += 1;
        false
    })
    .unwrap();
    assert_eq!(calls, 1);
}

#[test]
fn a_restart_cuts_the_partial_line_and_lists_closed_hours() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    let mut w = Writer::new(&dir);
    w.prepare(t("20240101T100000")).unwrap();
    w.append("2024/01/01/09", &lines(0..3, "20240101T090000"), true)
        .unwrap();
    w.append("2024/01/01/10", &lines(3..5, "20240101T100000"), true)
        .unwrap();
    drop(w);
    // A crash mid-write leaves half a line.
    let log10 = with_ext(&hour_base(&dir, "2024/01/01/10"), LOG);
    let mut f = OpenOptions::new().append(true).open(&log10).unwrap();
    f.write_all(b"20240101T100001.000 201 rad").unwrap();
    drop(f);
    let mut w = Writer::new(&dir);
    let closed = w.prepare(t("20240101T103000")).unwrap();
    assert_eq!(closed, ["2024/01/01/09"]);
    assert_eq!(w.take_closed(), ["2024/01/01/09"]);
    assert_eq!(fs::read(&log10).unwrap(), lines(3..5, "20240101T100000"));
    w.append("2024/01/01/10", &lines(5..6, "20240101T100000"), true)
        .unwrap();
    assert_eq!(fs::read(&log10).unwrap(), lines(3..6, "20240101T100000"));
    // A clock set back never reopens an older hour.
    assert_eq!(w.hour_for(t("20240101T080000")), "2024/01/01/10");
    assert_eq!(w.hour_for(t("20240101T120000")), "2024/01/01/12");
    w.close_before("2024/01/01/10").unwrap();
    assert!(w.take_closed().is_empty());
    w.close_before("2024/01/01/11").unwrap();
    assert_eq!(w.take_closed(), ["2024/01/01/10"]);
}

#[test]
fn a_failed_write_leaves_nothing_and_is_written_again_later() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    let mut w = Writer::new(&dir);
    w.prepare(t("20240101T100000")).unwrap();
    let hour = "2024/01/01/10";
    w.append(hour, &lines(0..2, "20240101T100000"), true)
        .unwrap();
    let log = with_ext(&hour_base(&dir, hour), LOG);
    // The disk fills up: the hour's file now writes to /dev/full (ENOSPC).
    let kept = fs::read(&log).unwrap();
    fs::rename(&log, tmp.path().join("kept")).unwrap();
    std::os::unix::fs::symlink("/dev/full", &log).unwrap();
    w.open.as_mut().unwrap().file = None;
    let batch = lines(2..4, "20240101T100000");
    let e = w.append(hour, &batch, true).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(28), "{e}"); // ENOSPC
    assert!(w.append(hour, &batch, true).is_err());
    // Space again: the file comes back with what it had; the batch is written once.
    fs::remove_file(&log).unwrap();
    fs::rename(tmp.path().join("kept"), &log).unwrap();
    w.append(hour, &batch, true).unwrap();
    let mut want = kept;
    want.extend_from_slice(&batch);
    assert_eq!(fs::read(&log).unwrap(), want);
}

#[test]
fn an_unwritable_directory_is_an_error_until_it_is_fixed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    fs::write(&dir, b"not a directory").unwrap();
    let mut w = Writer::new(&dir);
    assert!(w.prepare(t("20240101T100000")).is_err());
    assert!(!w.is_prepared());
    fs::remove_file(&dir).unwrap();
    w.prepare(t("20240101T100000")).unwrap();
    w.append("2024/01/01/10", &lines(0..1, "20240101T100000"), false)
        .unwrap();
}

#[test]
fn retention_removes_old_hours_and_empty_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    let mut w = Writer::new(&dir);
    w.prepare(t("20231231T230000")).unwrap();
    for h in ["2023/12/31/23", "2024/01/01/00", "2024/01/02/05"] {
        w.append(h, &lines(0..1, "20240101T000000"), false).unwrap();
    }
    let stop = AtomicBool::new(false);
    for h in w.take_closed() {
        compress_hour(&dir, &h, 1, &stop).unwrap();
    }
    assert_eq!(remove_before(&dir, "2024/01/02/00").unwrap(), 2);
    assert!(!dir.join("2023").exists());
    assert!(!dir.join("2024/01/01").exists());
    let left: Vec<String> = list_hours(&dir)
        .unwrap()
        .into_iter()
        .map(|h| h.hour)
        .collect();
    assert_eq!(left, ["2024/01/02/05"]);
}

#[test]
fn cluster_directories_in_both_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    for c in ["ddsr.cmc", "ddsr.sci"] {
        fs::create_dir_all(tmp.path().join(c).join("2024/01/01")).unwrap();
    }
    fs::create_dir_all(tmp.path().join("not-a-cluster/x")).unwrap();
    let all = clusters_of(tmp.path()).unwrap();
    let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["ddsr.cmc", "ddsr.sci"]);
    let one = clusters_of(&tmp.path().join("ddsr.sci")).unwrap();
    assert_eq!(one[0].0, "ddsr.sci");
}

#[test]
fn an_hour_is_kept_in_the_callers_buffer_when_it_fits() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("x.log");
    let mut text = lines(0..60_000, "20240101T100000");
    text.extend_from_slice(b"partial");
    fs::write(&p, &text).unwrap();
    let mut data = Vec::new();
    for (cap, keeps) in [(64 << 20, true), (CHUNK, false), (0, false)] {
        let mut got = Vec::new();
        let kept = for_each_chunk_in(&p, false, &mut data, cap, &mut |c| {
            got.extend_from_slice(c);
            true
        })
        .unwrap();
        assert_eq!(got, text, "cap {cap}");
        assert_eq!(kept.is_some(), keeps, "cap {cap}");
        if let Some(n) = kept {
            assert_eq!(&data[..n], &text[..]);
        }
    }
}
