-- Argo CD health of a kubetune ModelDeployment (resource_customizations/kubetune.dev/ModelDeployment).
-- Healthy when the operator reports phase Ready (all replicas ready); the URL is in the message.
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
  hs.message = "Waiting for the kubetune operator to pick the deployment up"
  return hs
end
local generation = (obj.metadata or {}).generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to act on generation " .. tostring(generation)
  return hs
end

local phase = status.phase
if phase == "Ready" then
  hs.status = "Healthy"
  hs.message = "Serving " .. (status.ready or "") .. (status.url and (" at " .. status.url) or "")
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = explain(status, "False", "Ready") or explain(status, "False") or "Deployment failed"
else -- Pending (e.g. waiting for its FineTuneJob), Progressing (rolling out)
  hs.status = "Progressing"
  hs.message = explain(status, "False", "Ready") or (phase .. (status.ready and (" " .. status.ready) or ""))
end
return hs
