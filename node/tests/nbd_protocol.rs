//! Raw-socket tests of the NBD server: malformed input, option haggling
//! corner cases, pipelining, and shutdown behaviour.

mod nbd_support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use metro_node::block::ExportError;
use metro_node::nbd::proto::*;
use metro_node::nbd::wire;
use metro_node::nbd::NbdLimits;
use nbd_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn one_export(size: u64, limits: NbdLimits) -> (TestServer, std::sync::Arc<MemDevice>) {
    let reg = MemRegistry::new();
    let dev = MemDevice::new(size);
    reg.add("vol", dev.clone());
    (TestServer::start(reg, limits).await, dev)
}

async fn assert_round_trip_works(c: &mut RawClient, cookie: u64) {
    let data = pattern(4096, cookie);
    c.send(NBD_CMD_WRITE, 0, cookie, 8192, 4096, &data).await;
    let r = c.recv().await;
    assert_eq!((r.cookie, r.error), (cookie, 0));
    c.send(NBD_CMD_READ, 0, cookie + 1, 8192, 4096, &[]).await;
    let r = c.recv().await;
    assert_eq!((r.cookie, r.error), (cookie + 1, 0));
    assert_eq!(r.data, data);
}

async fn malformed_requests_get_spec_errors(structured: bool) {
    let (srv, _dev) = one_export(MIB, small_limits()).await;
    let mut c = RawClient::connect(srv.addr, "vol", structured).await;

    // Oversized READ: EOVERFLOW.
    c.send(NBD_CMD_READ, 0, 1, 0, 64 * 1024 + 1, &[]).await;
    let r = c.recv().await;
    assert_eq!((r.cookie, r.error), (1, NBD_EOVERFLOW));
    if structured {
        assert!(r.message.contains("maximum payload"), "message: {}", r.message);
    }
    // Oversized WRITE with its payload: EOVERFLOW, payload skipped.
    let big = vec![0xeeu8; 64 * 1024 + 512];
    c.send(NBD_CMD_WRITE, 0, 2, 0, big.len() as u32, &big).await;
    assert_eq!(c.recv().await.error, NBD_EOVERFLOW);
    // Out-of-range READ: EINVAL; out-of-range WRITE: ENOSPC (payload consumed).
    c.send(NBD_CMD_READ, 0, 3, MIB - 512, 1024, &[]).await;
    assert_eq!(c.recv().await.error, NBD_EINVAL);
    c.send(NBD_CMD_WRITE, 0, 4, MIB, 512, &[1u8; 512]).await;
    assert_eq!(c.recv().await.error, NBD_ENOSPC);
    // Offset overflow past u64.
    c.send(NBD_CMD_TRIM, 0, 5, u64::MAX - 10, 4096, &[]).await;
    assert_eq!(c.recv().await.error, NBD_EINVAL);
    // Unknown command type, and an unadvertised command: EINVAL.
    c.send(42, 0, 6, 0, 512, &[]).await;
    assert_eq!(c.recv().await.error, NBD_EINVAL);
    c.send(NBD_CMD_BLOCK_STATUS, 0, 7, 0, 512, &[]).await;
    assert_eq!(c.recv().await.error, NBD_EINVAL);
    // Unknown flag on a READ: EINVAL.
    c.send(NBD_CMD_READ, 0x100, 8, 0, 512, &[]).await;
    assert_eq!(c.recv().await.error, NBD_EINVAL);

    // The connection and the export are still healthy.
    assert_round_trip_works(&mut c, 100).await;
    let stats = srv.server.stats();
    assert_eq!(stats.errors, 8);
    assert!(stats.requests >= 10);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_spec_errors_with_structured_replies() {
    malformed_requests_get_spec_errors(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_spec_errors_with_simple_replies() {
    malformed_requests_get_spec_errors(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_magic_closes_only_that_connection() {
    let (srv, _dev) = one_export(MIB, small_limits()).await;
    let mut c = RawClient::connect(srv.addr, "vol", true).await;
    c.stream.write_all(&[0xde; 28]).await.unwrap();
    assert!(c.closed_by_server().await, "bad magic must close the connection");
    let mut c2 = RawClient::connect(srv.addr, "vol", true).await;
    assert_round_trip_works(&mut c2, 1).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_handshakes_close_the_connection_and_the_server_keeps_serving() {
    let (srv, _dev) = one_export(MIB, small_limits()).await;
    // Unknown client flags.
    let mut s = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.unwrap();
    s.write_all(&pattern(200, 7)).await.unwrap();
    let mut b = [0u8; 64];
    let n = tokio::time::timeout(CLIENT_TIMEOUT, s.read(&mut b)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0, "server must close on garbage");
    // Good flags, then a bad option magic.
    let mut s = RawClient::greet(srv.addr).await;
    s.write_all(&pattern(64, 9)).await.unwrap();
    let n = tokio::time::timeout(CLIENT_TIMEOUT, s.read(&mut b)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0, "server must close on a bad option magic");
    // An absurd option length.
    let mut s = RawClient::greet(srv.addr).await;
    let h = wire::encode_option_header(&wire::OptionHeader { option: NBD_OPT_GO, length: u32::MAX });
    s.write_all(&h).await.unwrap();
    let n = tokio::time::timeout(CLIENT_TIMEOUT, s.read(&mut b)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0, "server must close on a 4 GiB option");
    assert!(srv.server.stats().handshake_failures >= 3);

    let mut c = RawClient::connect(srv.addr, "vol", false).await;
    assert_round_trip_works(&mut c, 1).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn option_haggling_refuses_tls_unknown_options_and_unknown_exports() {
    let reg = MemRegistry::new();
    reg.add("vol", MemDevice::new(MIB));
    reg.refuse(
        "moved",
        ExportError::NotPrimary {
            volume: "moved".into(),
            primary: "node-b".into(),
            nbd: "10.0.0.2:10809".into(),
        },
    );
    let srv = TestServer::start(reg, NbdLimits::default()).await;
    let mut s = RawClient::greet(srv.addr).await;

    RawClient::send_option(&mut s, NBD_OPT_STARTTLS, &[]).await;
    let (t, msg) = RawClient::read_option_reply(&mut s).await;
    assert_eq!(t, NBD_REP_ERR_POLICY);
    assert!(String::from_utf8_lossy(&msg).contains("TLS is not offered"));

    RawClient::send_option(&mut s, 77, b"whatever").await;
    assert_eq!(RawClient::read_option_reply(&mut s).await.0, NBD_REP_ERR_UNSUP);

    RawClient::send_option(&mut s, NBD_OPT_LIST, b"x").await;
    assert_eq!(RawClient::read_option_reply(&mut s).await.0, NBD_REP_ERR_INVALID);

    RawClient::send_option(&mut s, NBD_OPT_GO, &[0, 0, 0, 200, b'v']).await;
    assert_eq!(RawClient::read_option_reply(&mut s).await.0, NBD_REP_ERR_INVALID);

    let info = wire::InfoRequest { name: "moved".into(), requests: vec![] };
    RawClient::send_option(&mut s, NBD_OPT_INFO, &wire::encode_info_request(&info)).await;
    let (t, msg) = RawClient::read_option_reply(&mut s).await;
    assert_eq!(t, NBD_REP_ERR_UNKNOWN);
    let msg = String::from_utf8(msg).unwrap();
    assert!(msg.contains("served by its primary `node-b`"), "{msg}");

    // INFO on a good export: block size, export info, ACK; the session continues.
    let info = wire::InfoRequest { name: "vol".into(), requests: vec![NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME] };
    RawClient::send_option(&mut s, NBD_OPT_INFO, &wire::encode_info_request(&info)).await;
    let mut saw_export = false;
    loop {
        let (t, d) = RawClient::read_option_reply(&mut s).await;
        if t == NBD_REP_ACK {
            break;
        }
        assert_eq!(t, NBD_REP_INFO);
        if u16::from_be_bytes([d[0], d[1]]) == NBD_INFO_EXPORT {
            assert_eq!(u64::from_be_bytes(d[2..10].try_into().unwrap()), MIB);
            let flags = u16::from_be_bytes([d[10], d[11]]);
            assert_eq!(flags & NBD_FLAG_CAN_MULTI_CONN, NBD_FLAG_CAN_MULTI_CONN);
            assert_eq!(flags & NBD_FLAG_READ_ONLY, 0);
            saw_export = true;
        }
    }
    assert!(saw_export);

    RawClient::send_option(&mut s, NBD_OPT_ABORT, &[]).await;
    assert_eq!(RawClient::read_option_reply(&mut s).await.0, NBD_REP_ACK);
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).await.unwrap_or(0), 0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_option_enters_transmission_without_zero_padding() {
    let (srv, dev) = one_export(MIB, NbdLimits::default()).await;
    dev.fill(&pattern(4096, 3));
    let mut s = RawClient::greet(srv.addr).await;
    RawClient::send_option(&mut s, NBD_OPT_EXPORT_NAME, b"vol").await;
    let mut r = [0u8; 10];
    s.read_exact(&mut r).await.unwrap();
    assert_eq!(u64::from_be_bytes(r[0..8].try_into().unwrap()), MIB);
    let mut c = RawClient::from_stream(s, false);
    c.send(NBD_CMD_READ, 0, 5, 0, 4096, &[]).await;
    let reply = c.recv().await;
    assert_eq!(reply.data, pattern(4096, 3));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_complete_out_of_order_matched_by_cookie() {
    let (srv, dev) = one_export(MIB, NbdLimits::default()).await;
    dev.fill(&pattern(MIB as usize, 11));
    dev.set_slow_read(0, Duration::from_millis(400));
    let mut c = RawClient::connect(srv.addr, "vol", true).await;
    for i in 0..16u64 {
        c.send(NBD_CMD_READ, 0, 1000 + i, i * 4096, 4096, &[]).await;
    }
    let mut order = Vec::new();
    let expected = pattern(MIB as usize, 11);
    for _ in 0..16 {
        let r = c.recv().await;
        assert_eq!(r.error, 0);
        let i = (r.cookie - 1000) as usize;
        assert_eq!(r.data, expected[i * 4096..(i + 1) * 4096], "cookie {} got the wrong data", r.cookie);
        order.push(r.cookie);
    }
    assert_eq!(*order.last().unwrap(), 1000, "the slow read must finish last: {order:?}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_shutdown_answers_eshutdown_finishes_in_flight_then_closes() {
    let (srv, dev) = one_export(MIB, NbdLimits::default()).await;
    dev.fill(&pattern(4096, 5));
    dev.set_slow_read(0, Duration::from_millis(300));
    dev.shutdown_writes.store(true, Ordering::SeqCst);
    let mut c = RawClient::connect(srv.addr, "vol", true).await;
    c.send(NBD_CMD_READ, 0, 1, 0, 4096, &[]).await;
    c.send(NBD_CMD_WRITE, 0, 2, 4096, 512, &[9u8; 512]).await;
    let first = c.recv().await;
    assert_eq!((first.cookie, first.error), (2, NBD_ESHUTDOWN));
    assert!(first.message.contains("planned move"), "{}", first.message);
    let second = c.recv().await;
    assert_eq!((second.cookie, second.error), (1, 0), "in-flight read is still answered");
    assert_eq!(second.data, pattern(4096, 5));
    assert!(c.closed_by_server().await);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_shutdown_answers_in_flight_requests_then_closes() {
    let (srv, dev) = one_export(MIB, NbdLimits::default()).await;
    dev.set_slow_read(0, Duration::from_millis(300));
    let mut c = RawClient::connect(srv.addr, "vol", false).await;
    c.send(NBD_CMD_READ, 0, 1, 0, 4096, &[]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    srv.signal_shutdown();
    let r = c.recv().await;
    assert_eq!((r.cookie, r.error, r.data.len()), (1, 0, 4096));
    assert!(c.closed_by_server().await);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aligned_devices_refuse_unaligned_io_and_require_block_size_negotiation() {
    let reg = MemRegistry::new();
    reg.add("vol", MemDevice::with_blocks(MIB, 4096, 512));
    let srv = TestServer::start(reg, NbdLimits::default()).await;
    let mut s = RawClient::greet(srv.addr).await;
    let req = wire::InfoRequest { name: "vol".into(), requests: vec![] };
    RawClient::send_option(&mut s, NBD_OPT_GO, &wire::encode_info_request(&req)).await;
    assert_eq!(RawClient::read_option_reply(&mut s).await.0, NBD_REP_ERR_BLOCK_SIZE_REQD);
    drop(s);
    let mut c = RawClient::connect(srv.addr, "vol", true).await;
    c.send(NBD_CMD_READ, 0, 1, 100, 512, &[]).await;
    assert_eq!(c.recv().await.error, NBD_EINVAL);
    c.send(NBD_CMD_WRITE, 0, 2, 0, 100, &[1u8; 100]).await;
    assert_eq!(c.recv().await.error, NBD_EINVAL);
    assert_round_trip_works(&mut c, 3).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_in_transmission_never_break_the_server() {
    let (srv, _dev) = one_export(MIB, small_limits()).await;
    for seed in 1..=40u64 {
        let mut c = RawClient::connect(srv.addr, "vol", seed % 2 == 0).await;
        // Half the time start with a valid request magic so the parser goes deeper.
        let mut junk = pattern(28 * 8 + (seed as usize % 50), seed);
        if seed % 4 < 2 {
            junk[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
            junk[6..8].copy_from_slice(&((seed % 9) as u16).to_be_bytes());
        }
        c.stream.write_all(&junk).await.unwrap();
        c.stream.shutdown().await.unwrap();
        // Drain whatever the server answers until it closes; it must close.
        let mut sink = Vec::new();
        tokio::time::timeout(CLIENT_TIMEOUT, c.stream.read_to_end(&mut sink)).await.unwrap().ok();
    }
    let mut c = RawClient::connect(srv.addr, "vol", true).await;
    assert_round_trip_works(&mut c, 1).await;
    assert_eq!(srv.server.stats().connections_active, 1);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gigabyte_write_is_answered_eoverflow_and_the_connection_closed() {
    let (srv, _dev) = one_export(MIB, small_limits()).await;
    let mut c = RawClient::connect(srv.addr, "vol", true).await;
    c.send(NBD_CMD_WRITE, 0, 9, 0, 1 << 30, &[]).await;
    let r = c.recv().await;
    assert_eq!((r.cookie, r.error), (9, NBD_EOVERFLOW));
    assert!(c.closed_by_server().await, "the payload is too big to skip, so the server closes");
    let mut c2 = RawClient::connect(srv.addr, "vol", true).await;
    assert_round_trip_works(&mut c2, 1).await;
    srv.stop().await;
}
