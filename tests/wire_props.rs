//! Property tests for envelope decoding (a bounded slice of the `lockstep bench wire` fuzz):
//! any bytes decode to a value or a typed error, never a panic; valid envelopes round-trip.
use lockstep::wire::{
    decode_frame, prepare, Action, EnvelopeIds, Header, HostTensor, Limits, MetaDoc,
};
use proptest::prelude::*;

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct Plan {
    steps: u32,
    label: String,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn decode_of_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = decode_frame(&bytes, &Limits::default());
    }

    #[test]
    fn mutated_envelope_decodes_or_errors(pos in 0usize..400, val in any::<u8>(), cut in any::<bool>()) {
        let env = prepare(Action::Infer, EnvelopeIds::default(), &Plan { steps: 4, label: "x".into() },
            vec![HostTensor::from_f32("a", vec![2], &[1.0, 2.0])], &Limits::default()).unwrap();
        let mut f = env.header_bytes().to_vec();
        f.extend_from_slice(env.meta_bytes());
        let p = pos % f.len();
        if cut { f.truncate(p) } else { f[p] = val }
        let _ = decode_frame(&f, &Limits::default());
    }

    #[test]
    fn prepared_envelope_round_trips(steps in any::<u32>(), label in "[a-z]{0,12}", dims in proptest::collection::vec(1u64..5, 0..4)) {
        let n: u64 = dims.iter().product();
        let t = HostTensor::from_f32("t", dims.clone(), &vec![0.5; n as usize]);
        let plan = Plan { steps, label };
        let env = prepare(Action::Infer, EnvelopeIds::default(), &plan, vec![t], &Limits::default()).unwrap();
        let h = Header::decode(&env.header_bytes()).unwrap();
        let doc = MetaDoc::decode(env.meta_bytes(), h.meta_digest, h.n_tensors, h.payload_bytes, &Limits::default()).unwrap();
        prop_assert_eq!(doc.body_as::<Plan>().unwrap(), plan);
        prop_assert_eq!(&doc.tensor_specs[0].shape, &dims);
    }
}
