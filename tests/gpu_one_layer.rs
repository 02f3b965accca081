//! One GPU layer (issue 9 item 1), on one GPU: the NCCL layer and the model take the same `Gpu`
//! and buffer types. A one-rank NCCL communicator (the only kind one GPU allows: NCCL refuses
//! two ranks of a communicator on one device) sums a model-style bf16 and f32 buffer in place on
//! a stream of the model's kind (not the plane's), ordered after the kernel that wrote it and
//! before the copy that reads it; and an envelope-style byte buffer of the plane (`DeviceBuf`) is
//! read by a kernel as bf16 in place (`view_as`). With one rank a sum is the identity, so this
//! checks pointers, element counts, dtypes and stream order, not arithmetic across ranks (that
//! is the two-GPU issue's). Skips, printing why, without a GPU, kernels or NCCL.
mod common;

use half::bf16;
use lockstep::comm::nccl::{CommOptions, Communicator, UniqueId};
use lockstep::cuda::context::{fill_bf16, Fill};
use lockstep::cuda::Gpu;
use lockstep::ids::GroupRank;
use std::time::{Duration, Instant};

#[test]
fn nccl_sums_model_buffers_in_place_on_the_model_stream_and_kernels_read_plane_buffers() {
    let test =
        "nccl_sums_model_buffers_in_place_on_the_model_stream_and_kernels_read_plane_buffers";
    if common::skip_without_gpu(test) || common::skip_without_nccl(test, 1) {
        return;
    }
    // The plane's way of opening the GPU; kernels are loaded too (one context, one module set).
    let gpu = Gpu::open_for_plane(0).unwrap_or_else(|e| panic!("open GPU 0: {e}"));
    let uid = UniqueId::new().expect("NCCL unique id");
    let opts = CommOptions {
        name: "one-layer".into(),
        blocking: false,
        init_timeout: Duration::from_secs(30),
    };
    let comm = Communicator::init(&gpu, &uid, 1, GroupRank(0), &opts).expect("1-rank init");
    let model_stream = gpu.new_stream().expect("model stream");
    let deadline = || Instant::now() + Duration::from_secs(10);

    // bf16: a kernel writes it on the model stream, NCCL sums it there, a copy reads it there.
    let n = 3 * 4096 + 7;
    let mut a = model_stream.alloc_zeros::<bf16>(n).expect("alloc");
    fill_bf16(
        &gpu,
        &model_stream,
        &mut a,
        Fill::Uniform { seed: 11, amp: 2.0 },
    )
    .expect("fill");
    let mut before = vec![bf16::ZERO; n];
    model_stream.memcpy_dtoh(&a, &mut before).expect("read");
    model_stream.synchronize().expect("sync");
    assert!(before.iter().any(|v| v.to_f32() != 0.0), "the fill wrote");
    comm.all_reduce_sum_on(&gpu, &model_stream, &mut a.slice_mut(..), deadline())
        .expect("bf16 all-reduce on the model stream");
    let mut after = vec![bf16::ZERO; n];
    model_stream.memcpy_dtoh(&a, &mut after).expect("read");
    model_stream.synchronize().expect("sync");
    assert!(
        before == after,
        "a 1-rank bf16 sum must leave the buffer as it was"
    );

    // f32, a sub-range: the elements around it stay untouched.
    let host: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 7.0).collect();
    let mut f = model_stream.clone_htod(&host).expect("upload");
    comm.all_reduce_sum_on(&gpu, &model_stream, &mut f.slice_mut(100..900), deadline())
        .expect("f32 all-reduce");
    let mut back = vec![0f32; 1000];
    model_stream.memcpy_dtoh(&f, &mut back).expect("read");
    model_stream.synchronize().expect("sync");
    assert_eq!(
        back, host,
        "a 1-rank f32 sum must leave the buffer as it was"
    );

    // A plane buffer (bytes, as an envelope arrives) read by a kernel as bf16, in place.
    let vals: Vec<bf16> = (0..513).map(|i| bf16::from_f32(i as f32 - 256.0)).collect();
    let mut buf = gpu
        .upload(bytemuck::cast_slice(&vals))
        .expect("plane upload");
    {
        let mut v = buf.view_as_mut::<bf16>(vals.len()).expect("typed view");
        comm.all_reduce_sum_on(&gpu, gpu.stream(), &mut v, deadline())
            .expect("sum a plane buffer as bf16");
        fill_bf16(
            &gpu,
            gpu.stream(),
            &mut v.slice_mut(500..),
            Fill::Bits(0x3F80),
        )
        .expect("a kernel writes the plane buffer in place");
    }
    let bytes = gpu.download(&buf).expect("download");
    let got: &[bf16] = bytemuck::cast_slice(&bytes);
    assert_eq!(&got[..500], &vals[..500]);
    assert!(
        got[500..].iter().all(|v| *v == bf16::ONE),
        "the kernel's writes"
    );
    // A view that does not fit is refused, not made.
    assert!(buf.view_as::<bf16>(vals.len() + 1).is_err());
    assert!(buf.view_as::<f32>(vals.len() / 2 + 1).is_err());
    println!("{test}: bf16 {n} + f32 800 summed in place on the model stream; plane buffer read as bf16 by a kernel");
}
