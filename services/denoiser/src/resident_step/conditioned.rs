//! A session branch's conditioning made once per session ([`Conditioned`]): checked as
//! Preprocess checks its inputs, decoded, and embedded where the model derives something from
//! it alone; then each resident step checks and decodes only its latents and timestep and runs
//! [`ModelAdapter::preprocess_embedded`], which gives the same bits as Preprocess on the whole
//! map.

use teaserve_proto::TensorMap;
use teaserve_proto::v1;

use crate::error::DenoiserError;
use crate::registry::{ModelAdapter, PreprocessOutput};
use crate::resident::Conditioned;
use crate::server::{Limits, decode_map, preprocess_inputs};
use crate::spec::check_tensor;

/// The inputs that change from step to step; everything else is conditioning.
const STEP_INPUTS: [&str; 2] = ["hidden_states", "timestep"];

/// This step's latents and timestep as a Preprocess input map.
fn step_map(hidden_states: &v1::Tensor, timestep: &v1::Tensor) -> TensorMap {
    TensorMap::from([
        (STEP_INPUTS[0].to_string(), hidden_states.clone()),
        (STEP_INPUTS[1].to_string(), timestep.clone()),
    ])
}

/// Checks `conditioning` with one step's latents and timestep (as Preprocess checks its
/// inputs), decodes it, and embeds what the model derives from it alone.
pub(crate) fn condition(
    model: &dyn ModelAdapter,
    conditioning: &TensorMap,
    hidden_states: &v1::Tensor,
    timestep: &v1::Tensor,
    limits: Limits,
) -> Result<Conditioned, DenoiserError> {
    let mut inputs = conditioning.clone();
    inputs.extend(step_map(hidden_states, timestep));
    let (mut decoded, bindings) = preprocess_inputs(model, &inputs, limits)?;
    let embedded = model.embed_conditioning(&decoded)?;
    decoded.retain(|name, _| !STEP_INPUTS.contains(&name.as_str()));
    // Later steps' latents are checked against these; name where the sizes came from.
    let bindings = STEP_INPUTS.iter().fold(bindings, |b, name| {
        b.renamed(name, &format!("{name} of an earlier step"))
    });
    Ok(Conditioned {
        bindings,
        decoded,
        embedded,
    })
}

/// Preprocess of the conditioned branch at `hidden_states` and `timestep`, which must agree
/// with the dimensions the conditioning bound: the same output as Preprocess on the whole
/// input map, bit for bit.
pub(crate) fn preprocess(
    model: &dyn ModelAdapter,
    conditioned: &Conditioned,
    hidden_states: &v1::Tensor,
    timestep: &v1::Tensor,
    limits: Limits,
) -> Result<PreprocessOutput, DenoiserError> {
    let info = model.info();
    let specs = &info.preprocess.inputs;
    let step = step_map(hidden_states, timestep);
    let mut bindings = conditioned.bindings.clone();
    for (name, t) in &step {
        let spec = specs
            .iter()
            .find(|s| s.name == name.as_str())
            .ok_or_else(|| {
                DenoiserError::Config(format!(
                    "{} declares no Preprocess input '{name}'",
                    info.model_type
                ))
            })?;
        check_tensor(
            "Preprocess",
            "inputs",
            spec,
            t,
            limits.max_message_bytes,
            &mut bindings,
        )?;
    }
    let mut inputs = conditioned.decoded.clone();
    inputs.extend(decode_map(&step, specs, info, limits.max_message_bytes)?);
    model.preprocess_embedded(&inputs, &conditioned.embedded)
}
