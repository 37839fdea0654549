-- Argo CD health check for the lmforge kinds (Corpus, PretrainRun, AlignmentRun, Evaluation, Sweep,
-- ScalingStudy).
-- Same precedence as the printer column's phase (lmforge_jobs.spec.derive_phase):
-- Invalid > Failed > Succeeded > Running > Waiting. Invalid and Failed are Degraded, Succeeded is Healthy,
-- Running and Waiting are Progressing, and so is a status the operator has not yet written or that
-- describes an older generation of the spec.
local hs = { status = "Progressing", message = "Waiting for the lmforge operator" }
if obj.status == nil then
  return hs
end

local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
local observed = obj.status.observedGeneration
if generation ~= nil and observed ~= nil and observed < generation then
  hs.message = "The operator has not yet acted on generation " .. tostring(generation)
  return hs
end

local function describe(condition, fallback)
  local text = condition.reason or fallback
  if condition.message ~= nil and condition.message ~= "" then
    text = text .. ": " .. condition.message
  end
  return text
end

local current = {}
local conditions = 0
local stale = 0
if obj.status.conditions ~= nil then
  for _, condition in ipairs(obj.status.conditions) do
    conditions = conditions + 1
    if generation ~= nil and condition.observedGeneration ~= nil and condition.observedGeneration < generation then
      stale = stale + 1
    elseif condition.status == "True" then
      current[condition.type] = condition
    end
  end
end

local order = {
  { type = "Invalid", status = "Degraded" },
  { type = "Failed", status = "Degraded" },
  { type = "Succeeded", status = "Healthy" },
  { type = "Running", status = "Progressing" },
  { type = "Waiting", status = "Progressing" },
}
for _, entry in ipairs(order) do
  local condition = current[entry.type]
  if condition ~= nil then
    hs.status = entry.status
    hs.message = describe(condition, entry.type)
    return hs
  end
end

if conditions > 0 and stale == conditions then
  hs.message = "The operator has not yet acted on generation " .. tostring(generation)
  return hs
end

-- No current condition is True (or there are none yet): fall back on the phase column.
local phases = {
  Invalid = "Degraded", Failed = "Degraded", Succeeded = "Healthy",
  Running = "Progressing", Waiting = "Progressing", Pending = "Progressing",
}
local phase = obj.status.phase
if phase ~= nil and phases[phase] ~= nil then
  hs.status = phases[phase]
  hs.message = phase
end
return hs
