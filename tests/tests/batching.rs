//! Cross-session batching in the denoiser: concurrent RunBlocks requests of different callers
//! with stackable shapes run as one batch, every caller gets exactly the bytes an unbatched
//! denoiser returns (the model's linear layers run their GEMM per sample, see
//! `models::layers::Linear`), and a bad request in the same batch fails alone.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read as _, Write as _};

use candle_core::{Device, Tensor};
use teaserve_proto::v1::{self, DType};
use teaserve_proto::{TensorMap, encode_tensor};
use teaserve_tests::{Fixture, TestDenoiser, fixtures_dir};
use tonic::Code;

/// RunBlocks inputs (streams, context) of the fixture's case `prefix` at `timestep`.
async fn run_blocks_request(
    d: &TestDenoiser,
    fx: &Fixture,
    prefix: &str,
    timestep: f32,
) -> v1::RunBlocksRequest {
    let mut inputs: TensorMap = fx.wire_inputs(prefix, DType::F32);
    let b = inputs["hidden_states"].shape[0] as usize;
    inputs.insert(
        "timestep".into(),
        encode_tensor(
            &Tensor::full(timestep, b, &Device::Cpu).unwrap(),
            DType::F32,
        )
        .unwrap(),
    );
    let pre = d
        .client()
        .await
        .preprocess(v1::PreprocessRequest {
            inputs,
            wire_dtype: DType::F32 as i32,
        })
        .await
        .unwrap()
        .into_inner();
    v1::RunBlocksRequest {
        streams: pre.streams,
        context: pre.context,
        wire_dtype: DType::F32 as i32,
        ..Default::default()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batched_run_blocks_equal_unbatched_bit_for_bit_and_bad_requests_fail_alone() {
    let fx = Fixture::load("flux-tiny");
    let model = fixtures_dir().join("flux-tiny");
    let model = model.to_str().unwrap();
    let plain = TestDenoiser::start(&["--model", model, "--cross-session-batching", "false"]).await;
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let batching = TestDenoiser::start(&[
        "--model",
        model,
        "--batch-window-ms",
        "500",
        "--metrics-listen",
        &metrics,
    ])
    .await;

    let reqs = vec![
        run_blocks_request(&plain, &fx, "", 0.9).await,
        run_blocks_request(&plain, &fx, "", 0.4).await,
        run_blocks_request(&plain, &fx, "b2.", 0.7).await,
    ];
    let mut want = Vec::new();
    for r in &reqs {
        want.push(
            plain
                .client()
                .await
                .run_blocks(r.clone())
                .await
                .unwrap()
                .into_inner(),
        );
    }
    // A request with a NaN joins the same window and must fail on its own.
    let mut bad = reqs[0].clone();
    let h = bad.streams.get_mut("hidden_states").unwrap();
    let mut data = h.data.to_vec();
    data[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
    h.data = data.into();

    let mut calls = Vec::new();
    for r in reqs.iter().cloned().chain([bad]) {
        let mut c = batching.client().await;
        calls.push(tokio::spawn(async move { c.run_blocks(r).await }));
    }
    let mut got = Vec::new();
    for c in calls {
        got.push(c.await.unwrap());
    }
    let bad_result = got.pop().unwrap();
    let status = bad_result.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    assert!(status.message().contains("NaN"), "{}", status.message());
    let got: Vec<v1::RunBlocksResponse> =
        got.into_iter().map(|g| g.unwrap().into_inner()).collect();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.streams.len(), w.streams.len());
        for (name, t) in &w.streams {
            let gt = &g.streams[name];
            assert_eq!(gt.shape, t.shape, "request {i} {name}: shape");
            assert!(
                gt.data == t.data,
                "request {i} {name}: batched bytes differ from unbatched"
            );
        }
    }
    // The four requests were handed over together (the bad one then failed validation alone,
    // the three good ones, 4 rows, ran as one computation).
    let text = scrape(port);
    let line = text
        .lines()
        .find(|l| l.contains("denoiser_run_blocks_batches_total{requests=\"4\"}"))
        .unwrap_or_else(|| panic!("no 4-request batch in the metrics:\n{text}"));
    eprintln!("{line}");
    assert!(line.ends_with(" 1"), "{line}");
    // The same batch again gives the same bytes.
    let mut calls = Vec::new();
    for r in reqs.iter().cloned() {
        let mut c = batching.client().await;
        calls.push(tokio::spawn(async move { c.run_blocks(r).await }));
    }
    for (c, first) in calls.into_iter().zip(&got) {
        let again = c.await.unwrap().unwrap().into_inner();
        for (name, t) in &first.streams {
            assert!(
                again.streams[name].data == t.data,
                "{name}: batching is not deterministic"
            );
        }
    }
}
