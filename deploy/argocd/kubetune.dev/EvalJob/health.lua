-- Argo CD health of a kubetune EvalJob (resource_customizations/kubetune.dev/EvalJob).
-- Same phases as a FineTuneJob; the result's main metric is shown when it succeeded.
local hs = {}

local function explain(status, want, type_)
  for _, c in ipairs(status.conditions or {}) do
    if c.status == want and (type_ == nil or c.type == type_) and (c.message or "") ~= "" then
      if c.reason ~= nil then return c.reason .. ": " .. c.message end
      return c.message
    end
  end
  return nil
end

local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to pick the evaluation up"
  return hs
end
local generation = (obj.metadata or {}).generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to act on generation " .. tostring(generation)
  return hs
end

local phase = status.phase
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = "Evaluation finished"
  if status.result ~= nil and status.result.mainMetric ~= nil then
    hs.message = hs.message .. ": " .. status.result.mainMetric
  end
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = explain(status, "True", "Failed") or explain(status, "False") or "Evaluation failed"
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = "Suspended (spec.suspend is true)"
elseif phase == "Queued" then
  hs.status = "Progressing"
  hs.message = "Queued: waiting for Kueue to admit the workload"
else -- Pending (e.g. waiting for its FineTuneJob), Running
  hs.status = "Progressing"
  hs.message = explain(status, "False") or phase
end
return hs
