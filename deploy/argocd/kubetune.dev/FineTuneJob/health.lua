-- Argo CD health of a kubetune FineTuneJob (resource_customizations/kubetune.dev/FineTuneJob).
-- The operator writes only status: phase, conditions (with reason and message) and progress.
local hs = {}

-- "Reason: message" of the first condition with this status (and type, when given).
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
  hs.message = "Waiting for the kubetune operator to pick the job up"
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
  hs.message = "Training finished"
  if status.result ~= nil and status.result.finalLoss ~= nil then
    hs.message = hs.message .. string.format(", final loss %.4g", status.result.finalLoss)
  end
elseif phase == "Failed" then
  hs.status = "Degraded"
  -- Failed=True says why it ran and failed; Created=False (InvalidSpec) why it never ran.
  hs.message = explain(status, "True", "Failed") or explain(status, "False") or "Training failed"
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = "Suspended (spec.suspend is true)"
elseif phase == "Queued" then
  hs.status = "Progressing"
  hs.message = "Queued: waiting for Kueue to admit the workload"
else -- Pending, Running
  hs.status = "Progressing"
  local p = status.progress
  if p ~= nil and p.step ~= nil and p.totalSteps ~= nil then
    hs.message = string.format("%s: step %d/%d", phase, p.step, p.totalSteps)
    if p.loss ~= nil then hs.message = hs.message .. string.format(", loss %.4g", p.loss) end
  else
    hs.message = explain(status, "False") or phase
  end
end
return hs
