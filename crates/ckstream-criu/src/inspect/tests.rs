//! Inspection of synthetic CRIU images in an in-memory archive (unit tests: the images
//! are encoded here with CRIU's own definitions, not written by CRIU; the integration
//! tests inspect real dumps).

use ckstream_format::testutil::{open_in_memory, MemSink};
use ckstream_format::{ArchiveWriter, Entry, EntryKind, WriterOptions};
use prost::Message;

use super::*;
use crate::images::criu_pb::{FownEntry, PipeEntry, RegFileEntry, SkOptsEntry, TaskCoreEntry};
use crate::images::IMG_COMMON_MAGIC;

const PID: u32 = 100;
const CHILD: u32 = 101;
const ARGS_AT: u64 = 0x7ffd_0000_0000;

fn image(magic: u32, msgs: &[Vec<u8>]) -> Vec<u8> {
    let mut out = IMG_COMMON_MAGIC.to_le_bytes().to_vec();
    out.extend_from_slice(&magic.to_le_bytes());
    for m in msgs {
        out.extend_from_slice(&(m.len() as u32).to_le_bytes());
        out.extend_from_slice(m);
    }
    out
}

fn archive(files: &[(String, Vec<u8>)]) -> ArchiveReader {
    let (sinks, boxed) = MemSink::many(1);
    let mut w = ArchiveWriter::new(boxed, WriterOptions::default(), [7; 16], 0).unwrap();
    w.add_entry(Entry {
        path: b"criu".to_vec(),
        kind: EntryKind::Dir as i32,
        mode: 0o755,
        ..Default::default()
    })
    .unwrap();
    for (name, bytes) in files {
        let id = w
            .add_entry(Entry {
                path: format!("criu/{name}").into_bytes(),
                kind: EntryKind::File as i32,
                mode: 0o600,
                size: bytes.len() as u64,
                ..Default::default()
            })
            .unwrap();
        if !bytes.is_empty() {
            w.add_data(id, 0, bytes.clone(), None).unwrap();
        }
    }
    w.finish().unwrap();
    open_in_memory(&[sinks[0].take()]).unwrap()
}

fn fown() -> FownEntry {
    FownEntry::default()
}

fn reg(id: u32, name: &str, flags: u32, pos: u64) -> FileEntry {
    FileEntry {
        r#type: FdTypes::Reg as i32,
        id,
        reg: Some(RegFileEntry {
            id,
            flags,
            pos,
            fown: fown(),
            name: name.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A two-process tree: the parent has a log file, a pipe to its child, a listening
/// TCP socket and a bound unix socket; its command line and environment are in its
/// one page of dumped memory.
fn tree() -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    let put = |files: &mut Vec<(String, Vec<u8>)>, name: &str, bytes: Vec<u8>| {
        files.push((name.to_string(), bytes));
    };
    let mut inv = crate::images::INVENTORY_MAGIC.to_le_bytes().to_vec();
    let body = InventoryEntry {
        img_version: 2,
        lsmtype: Some(0),
        dump_criu_run_id: Some("run-1".into()),
        ..Default::default()
    }
    .encode_to_vec();
    inv.extend_from_slice(&(body.len() as u32).to_le_bytes());
    inv.extend_from_slice(&body);
    put(&mut files, "inventory.img", inv);
    let pstree = |pid, ppid| {
        PstreeEntry {
            pid,
            ppid,
            pgid: PID,
            sid: PID,
            threads: vec![pid],
        }
        .encode_to_vec()
    };
    put(
        &mut files,
        "pstree.img",
        image(0x5027_3030, &[pstree(PID, 0), pstree(CHILD, PID)]),
    );
    for (pid, comm) in [(PID, "server"), (CHILD, "worker")] {
        let core = CoreEntry {
            mtype: 1,
            tc: Some(TaskCoreEntry {
                task_state: 1,
                comm: comm.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        put(
            &mut files,
            &format!("core-{pid}.img"),
            image(0x5505_3847, &[core.encode_to_vec()]),
        );
        let ids = TaskKobjIdsEntry {
            vm_id: pid,
            files_id: pid,
            fs_id: pid,
            sighand_id: pid,
            ..Default::default()
        };
        put(
            &mut files,
            &format!("ids-{pid}.img"),
            image(0x5443_2030, &[ids.encode_to_vec()]),
        );
    }
    let tcp = FileEntry {
        r#type: FdTypes::Inetsk as i32,
        id: 4,
        isk: Some(InetSkEntry {
            id: 4,
            ino: 9001,
            family: 2,
            r#type: 1,
            proto: 6,
            state: 10,
            src_port: 8080,
            backlog: 128,
            src_addr: vec![u32::from_ne_bytes([127, 0, 0, 1])],
            fown: fown(),
            opts: SkOptsEntry::default(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let unix = FileEntry {
        r#type: FdTypes::Unixsk as i32,
        id: 5,
        usk: Some(UnixSkEntry {
            id: 5,
            ino: 9002,
            r#type: 1,
            state: 10,
            backlog: 5,
            fown: fown(),
            opts: SkOptsEntry::default(),
            name: b"/run/server.sock".to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let pipe = |id, flags| FileEntry {
        r#type: FdTypes::Pipe as i32,
        id,
        pipe: Some(PipeEntry {
            id,
            pipe_id: 777,
            flags,
            fown: fown(),
        }),
        ..Default::default()
    };
    let all = [
        reg(1, "/var/log/server.log", 0o2001, 4096),
        reg(2, "/srv", 0, 0),
        reg(3, "/usr/bin/server", 0, 0),
        tcp,
        unix,
        pipe(6, 1),
        pipe(7, 0),
    ];
    put(
        &mut files,
        "files.img",
        image(
            0x5630_3138,
            &all.iter().map(Message::encode_to_vec).collect::<Vec<_>>(),
        ),
    );
    let fd = |fd, id, t: FdTypes| {
        FdinfoEntry {
            id,
            flags: 0,
            r#type: t as i32,
            fd,
            ..Default::default()
        }
        .encode_to_vec()
    };
    put(
        &mut files,
        &format!("fdinfo-{PID}.img"),
        image(
            0x5621_3732,
            &[
                fd(5, 4, FdTypes::Inetsk),
                fd(3, 1, FdTypes::Reg),
                fd(4, 6, FdTypes::Pipe),
                fd(6, 5, FdTypes::Unixsk),
            ],
        ),
    );
    put(
        &mut files,
        &format!("fdinfo-{CHILD}.img"),
        image(0x5621_3732, &[fd(0, 7, FdTypes::Pipe)]),
    );
    put(
        &mut files,
        &format!("fs-{PID}.img"),
        image(
            0x5140_3912,
            &[FsEntry {
                cwd_id: 2,
                root_id: 2,
                umask: Some(0o22),
            }
            .encode_to_vec()],
        ),
    );
    let args = b"server\0--port\08080\0";
    let env = b"HOME=/root\0TOKEN=abc\0";
    let mm = MmEntry {
        mm_arg_start: ARGS_AT,
        mm_arg_end: ARGS_AT + args.len() as u64,
        mm_env_start: ARGS_AT + 64,
        mm_env_end: ARGS_AT + 64 + env.len() as u64,
        exe_file_id: 3,
        vmas: vec![
            VmaEntry {
                start: 0x40_0000,
                end: 0x40_2000,
                prot: 5,
                flags: 2,
                status: 1 | (1 << 6),
                shmid: 3,
                fd: -1,
                ..Default::default()
            },
            VmaEntry {
                start: ARGS_AT - 0x1000,
                end: ARGS_AT + 0x1000,
                prot: 3,
                flags: 0x22,
                status: 1 | (1 << 1),
                fd: -1,
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    put(
        &mut files,
        &format!("mm-{PID}.img"),
        image(0x5749_2820, &[mm.encode_to_vec()]),
    );
    let pagemap = image(
        0x5608_4025,
        &[
            PagemapHead { pages_id: 1 }.encode_to_vec(),
            PagemapEntry {
                vaddr: ARGS_AT - 0x1000,
                nr_pages: 1,
                in_parent: None,
                flags: Some(PE_PRESENT),
            }
            .encode_to_vec(),
            PagemapEntry {
                vaddr: ARGS_AT,
                nr_pages: 1,
                in_parent: None,
                flags: Some(PE_PRESENT | PE_LAZY),
            }
            .encode_to_vec(),
        ],
    );
    put(&mut files, &format!("pagemap-{PID}.img"), pagemap);
    let mut pages = vec![0xaau8; 8192];
    pages[4096..4096 + args.len()].copy_from_slice(args);
    pages[4096 + 64..4096 + 64 + env.len()].copy_from_slice(env);
    put(&mut files, "pages-1.img", pages);
    put(&mut files, "tmpfs-dev-42.tar.gz.img", vec![1, 2, 3]);
    files
}

#[test]
fn every_section_reads_back_from_the_images() {
    let r = archive(&tree());
    let opts = InspectOptions {
        cmdline: true,
        environment: true,
    };
    let got = inspect(&r, opts).unwrap();
    let inv = got.inventory.as_ref().unwrap();
    assert_eq!(inv.image_version, 2);
    assert_eq!(inv.lsm.as_deref(), Some("none"));
    assert_eq!(inv.criu_run_id.as_deref(), Some("run-1"));
    assert_eq!(got.memory_bytes, 8192);
    let unknown: Vec<&str> = got
        .images
        .iter()
        .filter(|i| !i.decoded)
        .map(|i| i.name.as_str())
        .collect();
    assert_eq!(unknown, ["pages-1.img", "tmpfs-dev-42.tar.gz.img"]);

    let [server, worker] = got.processes.as_slice() else {
        panic!("{:?}", got.processes);
    };
    assert_eq!(
        (server.pid, server.ppid, worker.pid, worker.ppid),
        (PID, 0, CHILD, PID)
    );
    assert_eq!(
        (server.comm.as_str(), server.state.as_str()),
        ("server", "alive")
    );
    assert_eq!(worker.comm, "worker");
    assert_eq!(
        server.cmdline.as_deref().unwrap(),
        ["server", "--port", "8080"]
    );
    assert_eq!(
        server.environment.as_deref().unwrap(),
        ["HOME=/root", "TOKEN=abc"]
    );
    assert_eq!(server.exe.as_deref(), Some("/usr/bin/server"));
    assert_eq!(server.cwd.as_deref(), Some("/srv"));

    let fds: Vec<(u32, &str)> = server
        .files
        .iter()
        .map(|f| (f.fd, f.kind.as_str()))
        .collect();
    assert_eq!(fds, [(3, "file"), (4, "pipe"), (5, "inet"), (6, "unix")]);
    let log = &server.files[0];
    assert_eq!(log.path.as_deref(), Some("/var/log/server.log"));
    assert_eq!((log.mode.as_deref(), log.position), (Some("w"), Some(4096)));
    assert_eq!(server.files[1].pipe_id, Some(777));
    assert_eq!(worker.files[0].pipe_id, Some(777));
    assert_eq!(worker.files[0].mode.as_deref(), Some("r"));
    let tcp = server.files[2].socket.as_ref().unwrap();
    assert_eq!(
        (
            tcp.family.as_str(),
            tcp.kind.as_str(),
            tcp.state.as_str(),
            tcp.local.as_str()
        ),
        ("inet", "stream", "listen", "127.0.0.1:8080")
    );
    assert_eq!((tcp.remote.as_ref(), tcp.backlog), (None, Some(128)));
    let unix = server.files[3].socket.as_ref().unwrap();
    assert_eq!(unix.local, "/run/server.sock");

    let vmas = &server.memory.vmas;
    assert_eq!(vmas.len(), 2);
    assert_eq!(
        (vmas[0].perms.as_str(), vmas[0].kind.as_str()),
        ("r-xp", "file")
    );
    assert_eq!(vmas[0].file.as_deref(), Some("/usr/bin/server"));
    assert_eq!(
        (vmas[1].perms.as_str(), vmas[1].kind.as_str()),
        ("rw-p", "stack")
    );
    assert_eq!(vmas[1].dumped_bytes, 8192);
    assert_eq!(
        (server.memory.dumped_bytes, server.memory.lazy_bytes),
        (8192, 4096)
    );
    assert!(worker.memory.vmas.is_empty());

    // Memory reads come from the page image through the pagemap.
    assert_eq!(
        read_memory(&r, PID, ARGS_AT - 2, 4).unwrap(),
        [0xaa, 0xaa, b's', b'e']
    );
    assert!(read_memory(&r, PID, ARGS_AT + 0x1000, 1).is_err());
    assert!(read_memory(&r, CHILD, ARGS_AT, 1).is_err());
    let bytes = |b: &[u8]| Pattern::Bytes(b.to_vec());
    assert_eq!(
        search_memory(&r, PID, &bytes(b"TOKEN="), 10).unwrap(),
        [ARGS_AT + 64 + 11]
    );
    assert_eq!(
        search_memory(&r, PID, &bytes(&[0xaa; 3]), 2).unwrap().len(),
        2
    );
    assert!(search_memory(&r, PID, &bytes(b"absent"), 10)
        .unwrap()
        .is_empty());
    let re = Pattern::Regex(regex::bytes::Regex::new("(?-u)[A-Z]+=[a-z/]+").unwrap());
    assert_eq!(
        search_memory(&r, PID, &re, 10).unwrap(),
        [ARGS_AT + 64, ARGS_AT + 64 + 11]
    );
    // Without the options, no page is read.
    let plain = inspect(&r, InspectOptions::default()).unwrap();
    assert!(plain.processes[0].cmdline.is_none() && plain.processes[0].environment.is_none());
}

#[test]
fn a_malformed_image_is_a_corrupt_archive_naming_it() {
    for (victim, cut) in [("pstree.img", 3usize), ("files.img", 11), ("mm-100.img", 9)] {
        let mut files = tree();
        let f = files.iter_mut().find(|(n, _)| n == victim).unwrap();
        let keep = f.1.len() - cut;
        f.1.truncate(keep);
        let r = archive(&files);
        let e = inspect(&r, InspectOptions::default()).unwrap_err();
        let CriuError::Archive(ckstream_format::Error::Corrupt(m)) = &e else {
            panic!("{victim}: {e}");
        };
        assert!(m.contains(victim), "{m}");
    }
    // Not an image at all.
    let mut files = tree();
    files
        .iter_mut()
        .find(|(n, _)| n == "core-101.img")
        .unwrap()
        .1 = b"garbage!".to_vec();
    let e = inspect(&archive(&files), InspectOptions::default()).unwrap_err();
    assert!(e.to_string().contains("core-101.img"), "{e}");
}

#[test]
fn diff_names_an_opened_file_and_the_changed_memory() {
    let a_files = tree();
    let mut b_files = tree();
    let fdinfo = b_files
        .iter_mut()
        .find(|(n, _)| *n == format!("fdinfo-{PID}.img"))
        .unwrap();
    let extra = FdinfoEntry {
        id: 2,
        flags: 0,
        r#type: FdTypes::Reg as i32,
        fd: 9,
        ..Default::default()
    }
    .encode_to_vec();
    fdinfo
        .1
        .extend_from_slice(&(extra.len() as u32).to_le_bytes());
    fdinfo.1.extend_from_slice(&extra);
    let pages = b_files
        .iter_mut()
        .find(|(n, _)| n == "pages-1.img")
        .unwrap();
    pages.1[0] ^= 0xff;
    let (a, b) = (archive(&a_files), archive(&b_files));
    let opts = InspectOptions::default();
    let (ia, ib) = (inspect(&a, opts).unwrap(), inspect(&b, opts).unwrap());
    let d = crate::diff::diff(&a, &ia, &b, &ib);
    assert!(d.processes_added.is_empty() && d.processes_gone.is_empty());
    let [c] = d.processes_changed.as_slice() else {
        panic!("{d:?}");
    };
    assert_eq!(c.pid, PID);
    let added: Vec<(u32, Option<&str>)> = c
        .files_added
        .iter()
        .map(|f| (f.fd, f.path.as_deref()))
        .collect();
    assert_eq!(added, [(9, Some("/srv"))]);
    assert!(c.files_gone.is_empty());
    // The page image is one chunk here: all of it counts as changed.
    assert_eq!(c.memory_changed_bytes, 8192);
    let same = crate::diff::diff(&a, &ia, &a, &ia);
    assert!(same.processes_changed.is_empty(), "{same:?}");
}
