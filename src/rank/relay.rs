//! The leader's relay of an accepted envelope to the whole mesh (header, meta, tensors by
//! broadcast), which followers validate with the same decoder as the lane.
use super::Rank;
use crate::comm::plane::{DataPlane, FromPlane, IntoPlane};
use crate::comm::recorder::OpContext;
use crate::error::{Error, Result};
use crate::ids::GroupRank;
use crate::wire::{Header, MetaDoc, ReceivedEnvelope, Tensor, HEADER_LEN};

impl<D: DataPlane> Rank<D> {
    /// Leader: broadcast `env` (header, meta, tensors) to the whole mesh; followers pass None and
    /// get the same envelope, validated by the same decoder. NOOP and SHUTDOWN relay as a header
    /// only. Followers check limits before allocating. The leader's tensors may live on either
    /// side (`S`: host bytes are uploaded first, `env.by_ref()` keeps the caller's envelope;
    /// data-plane buffers are broadcast as they are); every rank gets the envelope back in
    /// storage `R` (followers' buffers are allocated from the validated manifest, or recycled).
    pub fn relay_to_mesh<S: IntoPlane<D>, R: FromPlane<D>>(
        &self,
        env: Option<ReceivedEnvelope<S>>,
    ) -> Result<ReceivedEnvelope<R>> {
        // Into the data plane before the header is broadcast, as on `pp`.
        let env = match env {
            Some(e) => Some(ReceivedEnvelope {
                header: e.header,
                meta: e.meta,
                tensors: e
                    .tensors
                    .into_iter()
                    .map(|t| t.map_data(|d| d.into_plane(&*self.plane)))
                    .collect::<Result<Vec<_>>>()?,
            }),
            None => None,
        };
        let got = self.relay_buffers(env)?;
        self.hand_up(got)
    }

    fn relay_buffers(
        &self,
        env: Option<ReceivedEnvelope<D::Buffer>>,
    ) -> Result<ReceivedEnvelope<D::Buffer>> {
        let mesh = self.mesh();
        let root = GroupRank(0);
        let leader = mesh.me() == Some(root);
        let d = self.deadline();
        let head = match (leader, &env) {
            (true, Some(e)) => e.header.encode().to_vec(),
            (true, None) => {
                return Err(Error::Invariant(
                    "relay_to_mesh: the leader must pass the envelope".into(),
                ))
            }
            (false, _) => vec![0u8; HEADER_LEN],
        };
        let head = mesh.broadcast_bytes(&head, root, d)?;
        let h = Header::decode(&head)?;
        self.recorder.set_context(OpContext {
            call_id: h.call_id(),
            chunk_index: h.chunk_index(),
            cache_epoch: h.cache_epoch(),
            action: h.action().name().into(),
            phase: "relay".into(),
        });
        if !h.action().has_payload() {
            return Ok(ReceivedEnvelope {
                header: h,
                meta: None,
                tensors: Vec::new(),
            });
        }
        if h.meta_len > self.opts.limits.max_meta_bytes {
            return Err(Error::Decode(format!(
                "relayed meta of {} bytes exceeds the limit of {}",
                h.meta_len, self.opts.limits.max_meta_bytes
            )));
        }
        let meta_bytes = match env.as_ref().and_then(|e| e.meta.as_ref()) {
            Some(m) if leader => m.encode()?,
            _ => vec![0u8; h.meta_len as usize],
        };
        let meta_bytes = mesh.broadcast_bytes(&meta_bytes, root, d)?;
        let meta = MetaDoc::decode(
            &meta_bytes,
            h.meta_digest,
            h.n_tensors,
            h.payload_bytes,
            &self.opts.limits,
        )?;
        // Buffers first (followers allocate from the validated manifest only), then every
        // tensor's broadcast in one group: one launch and one host-visible completion per
        // envelope instead of one per tensor, as on `pp`. Debug mode issues them one by one: its
        // per-collective fingerprint exchange must complete before each op, which an open group
        // forbids.
        let mut own = match env {
            Some(e) if leader => e.tensors.into_iter().map(Some).collect::<Vec<_>>(),
            _ => Vec::new(),
        };
        let mut bufs = Vec::with_capacity(meta.tensor_specs.len());
        for (i, spec) in meta.tensor_specs.iter().enumerate() {
            bufs.push(match own.get_mut(i).and_then(Option::take) {
                Some(t) if t.spec() == *spec => t.data,
                Some(t) => {
                    return Err(Error::Invariant(format!(
                        "relay_to_mesh: the leader's tensor {i} ({:?}) is not what the manifest \
                         it relays says ({spec:?})",
                        t.spec()
                    )))
                }
                None if leader => {
                    return Err(Error::Invariant(format!(
                        "relay_to_mesh: the manifest names tensor {i} (`{}`) but the leader's \
                         envelope has no such tensor",
                        spec.name
                    )))
                }
                None => self.recv_buffer(spec.byte_len as usize)?,
            });
        }
        let grouped = !mesh.debug_collectives();
        if grouped {
            mesh.group_start()?;
        }
        let mut tickets = Vec::with_capacity(bufs.len());
        for (spec, buf) in meta.tensor_specs.iter().zip(bufs) {
            match mesh.broadcast(buf, root, spec.dtype, &spec.shape) {
                Ok(tk) => tickets.push(tk),
                Err(e) => {
                    if grouped {
                        let _ = mesh.group_end();
                    }
                    return Err(e);
                }
            }
        }
        if grouped {
            mesh.group_end()?;
        }
        let mut tensors = Vec::with_capacity(tickets.len());
        for (spec, tk) in meta.tensor_specs.iter().zip(tickets) {
            let data = mesh.wait(tk, d)?;
            tensors.push(Tensor::new(
                spec.name.clone(),
                spec.dtype,
                spec.shape.clone(),
                data,
            ));
        }
        Ok(ReceivedEnvelope {
            header: h,
            meta: Some(meta),
            tensors,
        })
    }
}
